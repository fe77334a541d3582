"""DeepSeek-V4's capture points: the hf engine (transformers generate, KV cache) captures
whole sequences whose rows are the pre-hc_head residual streams of a direct transformers
forward; and the vLLM declarations resolve on vLLM's real DSV4 module trees of every
platform — NVIDIA (what CUDA GPUs build), AMD, XPU, CPU — built on the meta device (their
kernels cannot run on this AVX2 machine), the NVIDIA function-level hook driven as
DeepseekV4Model.forward calls it."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from requant.orchestrator.cli import main as requant
from requant.storage import CaptureStore, StoreReader


@pytest.fixture(scope="module")
def dsv4(tiny_dsv4):
    return tiny_dsv4


def test_hf_engine_captures_pre_hc_head_states(dsv4, tmp_path):
    from transformers import AutoModelForCausalLM

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "tell me about the model"}\n'
                       '{"messages": [{"role": "user", "content": "why the router layer"}]}\n')
    assert requant(["capture", str(dsv4), "--engine", "hf", "--store", str(tmp_path / "cap"),
                    "--prompts", str(prompts), "--max-new-tokens", "6", "--writer", "hf0"]) == 0
    store = CaptureStore.open(str(tmp_path / "cap"))
    assert store.verify() == []
    assert (store.meta.hidden_size, store.meta.hc_mult, store.meta.capture_point) == (512, 4, "target_pre_head")
    seqs = list(StoreReader(store).sequences())
    assert len(seqs) == 2

    model = AutoModelForCausalLM.from_pretrained(dsv4, dtype=torch.float32)
    seen = []
    model.model.hc_head.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    for s in seqs:
        n = len(s.position)
        assert n >= 8 and s.position.tolist() == list(range(n))
        tokens = [int(t) for t in s.next_token]  # tokens[1:] of the sequence; token 0 is BOS
        ids = torch.tensor([[0] + tokens[:-1]])
        seen.clear()
        with torch.no_grad():
            final = model.model(ids).last_hidden_state[0]
        ref = seen[0][0]  # [n, 4, 512]: the one full-sequence forward, no cache
        got = torch.from_numpy(s.hidden.view(np.int16)).view(torch.bfloat16).float().view(n, 4, 512)
        rel = ((got - ref).flatten(1).norm(dim=-1) / ref.flatten(1).norm(dim=-1))
        assert rel.max() < 1e-2, rel  # bf16 storage of fp32 states (incremental decode vs one forward)
        # The rows are what hc_head consumes: hc_head + final norm of them give the model's output.
        with torch.no_grad():
            again = model.model.norm(model.model.hc_head(got.unsqueeze(0)))[0]
        assert ((again - final).norm(dim=-1) / final.norm(dim=-1)).max() < 2e-2


@pytest.fixture(scope="module")
def vllm_trees(dsv4, tmp_path_factory):
    """One subprocess: vLLM's DSV4 trees of every platform built on the meta device, every
    declared vLLM point resolved on them, and the NVIDIA function-level hook driven."""
    out = tmp_path_factory.mktemp("trees")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(__file__).with_name("_vllm_dsv4_trees.py")
    run = subprocess.run([sys.executable, str(script), str(dsv4), str(port), str(out)], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(l for l in run.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT ")), out


TREE = "vllm.models.deepseek_v4.{}.model.DeepseekV4ForCausalLM"


def test_target_point_resolves_on_every_platform_tree(vllm_trees):
    """NVIDIA (what every CUDA GPU builds): the argument of hc_head_fused_kernel_tilelang as
    DeepseekV4Model calls it, or vLLM's own _mtp_hidden_buffer when MTP speculative decoding
    allocates it; CPU/AMD/XPU: the HCHeadOp's input, or the same buffer."""
    res, _ = vllm_trees
    assert res["arch"] == "DeepseekV4ForCausalLM"
    for plat in ("nvidia", "amd", "xpu", "cpu"):
        plain, spec = res["target"][f"{plat}/plain"], res["target"][f"{plat}/spec"]
        for r in (plain, spec):
            assert r["row"] == [512, 4]
            assert r["input_ids"] == r["positions"] == [TREE.format(plat)]
        assert spec["hidden"] == ["buffer", "model", "DeepseekV4Model", "_mtp_hidden_buffer"]
        assert spec["hidden_found"] == [f"vllm.models.deepseek_v4.{plat}.model.DeepseekV4Model"]
        if plat == "nvidia":
            assert plain["hidden"] == ["call", "model", "DeepseekV4Model", "hc_head_fused_kernel_tilelang"]
            assert plain["hidden_found"] == ["vllm.models.deepseek_v4.nvidia.model.DeepseekV4Model"]
        else:
            assert plain["hidden"] == ["input", "model.hc_head_op", "HCHeadOp", None]
            assert plain["hidden_found"] == ["vllm.model_executor.layers.mhc.HCHeadOp"]


def test_mtp_point_resolves_on_every_mtp_tree(vllm_trees):
    res, _ = vllm_trees
    for plat in ("nvidia", "amd", "xpu"):
        r = res["mtp"][plat]
        layer = [f"vllm.models.deepseek_v4.{plat}.mtp.DeepSeekV4MultiTokenPredictorLayer"]
        assert r["hidden"] == ["input", "model.layers.*", "DeepSeekV4MultiTokenPredictorLayer", "previous_hidden_states"]
        assert r["hidden_found"] == r["input_ids"] == r["positions"] == layer
        assert r["ids_offset"] == 1 and r["row"] == [512, 4]
    assert "not implemented on CPU" in res["mtp"]["cpu"]["not_built"]  # vLLM's CPU tree has no DSV4 MTP
    assert "this model's class comes from 'vllm.models.deepseek_v4.cpu.mtp', which matches none" in \
        res["mtp"]["cpu"]["find_point"]


def test_compilation_refused_only_where_a_hook_would_sit_in_compiled_code(vllm_trees):
    """Without --enforce-eager: the NVIDIA model is not torch.compiled (CUDA graphs replay the
    stash copy), so its function hook is allowed; vLLM's CPU tree compiles DeepseekV4Model,
    so a hook on its HCHeadOp is refused naming the flag; the buffer is read after the forward."""
    c = vllm_trees[0]["compiled"]
    assert c["mode"] != "NONE" and c["nvidia"] is None and c["spec_buffer"] is None
    assert "input of model.hc_head_op (HCHeadOp), inside model (DeepseekV4Model)" in c["cpu"]
    assert "start vLLM with --enforce-eager" in c["cpu"]


def test_trees_that_match_nothing_fail_naming_what_was_looked_for(vllm_trees):
    err = vllm_trees[0]["errors"]
    e = err["nvidia_point_on_cpu_tree"]
    assert "none of the declared places resolves on vllm.models.deepseek_v4.cpu.model.DeepseekV4ForCausalLM" in e
    assert "_mtp_hidden_buffer (DeepseekV4Model) is not a tensor here (NoneType)" in e
    assert "vllm.models.deepseek_v4.cpu.model has no function 'hc_head_fused_kernel_tilelang'" in e
    assert "declared for the model trees vllm.models.deepseek_v4.nvidia.*" in err["undeclared_tree"]
    assert "'vllm.models.deepseek_v4.tpu.model', which matches none" in err["undeclared_tree"]
    # a checkpoint without mtp.0.* under MTP speculative decoding: vLLM's NVIDIA loader names the layer
    assert err["mtp_weights_missing"].startswith("MTP speculative decoding layer 2 weights missing from checkpoint")


def test_function_level_hook_rows_whole_and_in_order_and_removed_cleanly(vllm_trees):
    """The NVIDIA hook on vLLM's real DeepseekV4Model, the kernel replaced by a plain-torch
    stand-in (the tilelang kernel is CUDA-only) and called as DeepseekV4Model.forward calls it:
    a prefill and two padded decode steps of two requests land as two whole sequences in
    position order, bit for bit; a call of the same function with other parameters is not
    taken; after removal the namespace holds the original function and nothing is written."""
    res, out = vllm_trees
    fh = res["function_hook"]
    assert fh["hooked_while_attached"] and fh["hooked_transparent"] and fh["removed_transparent"]
    assert fh["stash_writes"] == 3  # three forwards; the other caller's three calls ignored
    assert fh["hooked_stats"]["sequences"] == 2 and fh["hooked_stats"]["dropped_sequences"] == 0
    expected = np.load(out / "expected.npz")
    store = CaptureStore.open(str(out / "hooked"))
    assert store.verify() == []
    seqs = {s.prompt_id: s for s in StoreReader(store).sequences()}
    assert sorted(seqs) == ["a", "b"]
    for req, s in seqs.items():
        tokens = fh["tokens"][req]
        assert s.position.tolist() == list(range(len(tokens) - 1)) and s.next_token.tolist() == tokens[1:]
        assert np.array_equal(s.hidden.view(np.int16), expected[req])  # whole rows, in order, exact
    assert fh["restored"] and fh["stash_untouched_after_remove"]
    assert fh["removed_stats"]["rows"] == fh["removed_stats"]["steps"] == 0
    assert CaptureStore.open(str(out / "removed")).info().rows == 0

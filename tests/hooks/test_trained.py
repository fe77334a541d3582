"""The trained tiny DeepSeek-V3 + MTP (hooks/trained.py): the committed checkpoint is what its
record says, within the kernels' constraints, position-free (q_pe rows zero), its held-out
prompts never trained on; the training model's export is the function transformers' DeepSeek-V3
and requant's own MTP block compute."""
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from requant.hooks.fixtures import dsv3_config
from requant.hooks.trained import (MODEL, TinyDSV3, _held_out, checkpoint_tensors, chunks, load_heldout, render,
                                   trained_path)


@pytest.fixture(scope="module")
def ckpt():
    return trained_path()


@pytest.fixture(scope="module")
def record(ckpt):
    return json.loads((ckpt / "training.json").read_text())


def test_committed_checkpoint_matches_its_record(ckpt, record):
    import hashlib

    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["kv_lora_rank"] == 512 and cfg["qk_rope_head_dim"] == 64 and cfg["num_nextn_predict_layers"] == 1
    assert cfg["n_routed_experts"] == 16 and cfg["moe_intermediate_size"] % 128 == 0 and cfg["hidden_size"] % 128 == 0
    assert (ckpt / "model.safetensors").stat().st_size < 20 << 20
    assert hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest() == record["model_sha256"]
    assert record["config"]["seed"] == 0 and record["seconds"]["total"] > 0
    assert record["target_losses"][-1][1] < record["target_losses"][0][1] - 2      # it learnt
    assert record["mtp_losses"][-1][1] < record["mtp_losses"][0][1] - 2
    for kind in ("code", "prose"):  # held out: the MTP's top-1 for token p+2 often is the target's
        assert record["heldout"][kind]["mtp_target_agreement"] > 0.4
        assert record["heldout"][kind]["target_ce"] < math.log(cfg["vocab_size"]) - 2    # far from uniform


def test_attention_is_position_free_and_mtp_shares_embedding_and_head(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    n, nh = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    nope, rope = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"]
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        for i in range(n + 1):
            qb = f.get_tensor(f"model.layers.{i}.self_attn.q_b_proj.weight").view(nh, nope + rope, -1)
            assert (qb[:, nope:] == 0).all(), i          # q_pe = 0: RoPE contributes nothing anywhere
        assert torch.equal(f.get_tensor(f"model.layers.{n}.embed_tokens.weight"), f.get_tensor("model.embed_tokens.weight"))
        assert torch.equal(f.get_tensor(f"model.layers.{n}.shared_head.head.weight"), f.get_tensor("lm_head.weight"))
        bias = f.get_tensor(f"model.layers.{n}.mlp.gate.e_score_correction_bias")
        assert bias.abs().max() > 0                      # the balancing moved it


def test_heldout_prompts_come_from_files_and_topics_never_trained_on(record):
    import hashlib

    files = {f["path"]: f["heldout"] for f in record["data"]["code_files"]}
    topics = {t["topic"]: t["heldout"] for t in record["data"]["prose_topics"]}
    assert 0 < sum(files.values()) < len(files) and 0 < sum(topics.values()) < len(topics)
    for name, flag in list(files.items()) + list(topics.items()):
        assert flag == _held_out(name)
    code, chat = load_heldout("code"), load_heldout("chat")
    assert len(code) >= 32 and len(chat) >= 32
    assert all(files[r["source"]] for r in code) and all(topics[r["source"]] for r in chat)
    for r in code + chat:  # ids name the text (a snippet found twice is one prompt to load_prompts)
        assert r["prompt_id"] == hashlib.sha256(f"{r['kind']}:{r['prompt']}".encode()).hexdigest()[:24]
    with pytest.raises(ValueError, match="'code' or 'chat'"):
        load_heldout("poems")


def test_chunks_and_chat_rendering():
    text = "".join(f"line {i}\n" for i in range(400))
    parts = chunks(text, 300)
    assert "".join(parts) == text and all(len(p) <= 300 for p in parts)
    chat = render("a\nb\nc\nd\n", chat=True)
    assert chat.startswith("<｜begin▁of▁sentence｜><｜User｜>a\n<｜Assistant｜>b\n") and chat.endswith("<｜end▁of▁sentence｜>")


@pytest.fixture(scope="module")
def random_export(tmp_path_factory):
    """A random TinyDSV3 (weights bf16-exact, a non-zero gate bias) and its exported checkpoint."""
    torch.manual_seed(0)
    c = {**dsv3_config(512), **MODEL}
    m = TinyDSV3(c)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.bfloat16().float())
        m.mtp_block.mlp.e_score_correction_bias.copy_((torch.randn(16) * 0.1).bfloat16().float())
    d = tmp_path_factory.mktemp("export")
    save_file(checkpoint_tensors(m), str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(c))
    return m, d


def test_export_is_what_transformers_deepseek_v3_computes(random_export):
    from transformers import DeepseekV3ForCausalLM

    m, d = random_export
    hf = DeepseekV3ForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        ours = m.lm_head(m.target_hidden(ids))
    assert (ref - ours).abs().max() < 1e-4 * ref.abs().max()


def test_export_mtp_is_what_the_replay_block_computes(random_export):
    from requant.quantizer.mtp.arch import load_block

    m, d = random_export
    block = load_block(d, device="cpu", dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 41), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h = m.target_hidden(ids)[0, :-1]
        logits, _ = m.mtp_logits(h[None], ids[:, 1:])
        z = block.head_input(h, ids[0, 1:], torch.arange(40), "full", [40])
        ours = z @ m.lm_head.weight.T
    assert (ours - logits[0]).abs().max() < 1e-4 * logits.abs().max()
    assert math.isclose(float((ours.argmax(-1) == logits[0].argmax(-1)).float().mean()), 1.0)

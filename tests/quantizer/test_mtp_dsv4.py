"""DeepSeek-V4 MTP block (quantizer/mtp/dsv4.py) against independent references on the tiny
fixture: `full` mode against transformers' DeepseekV4DecoderLayer holding the fixture's
mtp.0 weights; `identity` mode against a float64 per-row computation written from the
equations (reference notes §2)."""
import copy
import dataclasses
import math

import pytest
import torch

from requant.quantizer.mtp.arch import load_block
from requant.quantizer.mtp.weights import load_mtp_weights

# Measured on this fixture (CPU): fp32 block vs transformers fp32: max |ΔX| ≈ 1e-6 (X ~ 1);
# bf16 block (vLLM's precision) vs transformers fp32: relative ‖ΔX‖ ≈ 4e-3.
FP32_ATOL = 1e-4
BF16_REL = 2e-2


@pytest.fixture(scope="module")
def ckpt(tiny_dsv4):
    return tiny_dsv4


@pytest.fixture(scope="module")
def blocks(ckpt):
    return {torch.float32: load_block(ckpt, device="cpu", dtype=torch.float32),
            torch.bfloat16: load_block(ckpt, device="cpu")}


def _rows(block, lens, seed=0):
    """Synthetic store rows for sequences of ``lens`` (positions 0..L-1 each)."""
    g = torch.Generator().manual_seed(seed)
    d = block.dims
    T = sum(lens)
    hidden = (torch.randn(T, d.hc_mult * d.hidden, generator=g) * 2).bfloat16()
    tok = torch.randint(0, block.embed.shape[0], (T,), generator=g)
    pos = torch.cat([torch.arange(n) for n in lens])
    return hidden, tok, pos


def _hf_layer(ckpt, window):
    """transformers' decoder layer of the MTP's type (sliding attention, scored top-k MoE) with mtp.0's weights."""
    import json

    from transformers import DeepseekV4Config
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import (DeepseekV4DecoderLayer,
                                                                      DeepseekV4RotaryEmbedding)

    cfg = json.loads((ckpt / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    cfg.update(num_hidden_layers=n + 1, compress_ratios=cfg["compress_ratios"][:n] + [0, 0], sliding_window=window)
    hf_cfg = DeepseekV4Config(**cfg)
    hf_cfg._attn_implementation = "eager"
    assert hf_cfg.layer_types[n] == "sliding_attention" and hf_cfg.mlp_layer_types[n] == "moe"
    layer = DeepseekV4DecoderLayer(hf_cfg, layer_idx=n).eval()
    W = {k: v.float() for k, v in load_mtp_weights(ckpt, "mtp.0.").items()}
    E = cfg["n_routed_experts"]
    sd = {"self_attn.q_a_proj.weight": W["attn.wq_a.weight"], "self_attn.q_a_norm.weight": W["attn.q_norm.weight"],
          "self_attn.q_b_proj.weight": W["attn.wq_b.weight"], "self_attn.kv_proj.weight": W["attn.wkv.weight"],
          "self_attn.kv_norm.weight": W["attn.kv_norm.weight"], "self_attn.o_a_proj.weight": W["attn.wo_a.weight"],
          "self_attn.o_b_proj.weight": W["attn.wo_b.weight"], "self_attn.sinks": W["attn.attn_sink"],
          "input_layernorm.weight": W["attn_norm.weight"], "post_attention_layernorm.weight": W["ffn_norm.weight"],
          "mlp.gate.weight": W["ffn.gate.weight"], "mlp.gate.e_score_correction_bias": W["ffn.gate.bias"],
          "mlp.experts.gate_up_proj": torch.stack([torch.cat([W[f"ffn.experts.{e}.w1.weight"],
                                                              W[f"ffn.experts.{e}.w3.weight"]]) for e in range(E)]),
          "mlp.experts.down_proj": torch.stack([W[f"ffn.experts.{e}.w2.weight"] for e in range(E)]),
          "mlp.shared_experts.gate_proj.weight": W["ffn.shared_experts.w1.weight"],
          "mlp.shared_experts.up_proj.weight": W["ffn.shared_experts.w3.weight"],
          "mlp.shared_experts.down_proj.weight": W["ffn.shared_experts.w2.weight"]}
    for hc in ("attn", "ffn"):
        for p in ("fn", "base", "scale"):
            sd[f"{hc}_hc.{p}"] = W[f"hc_{hc}_{p}"]
    missing, unexpected = layer.load_state_dict(sd, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return layer, DeepseekV4RotaryEmbedding(hf_cfg)


def _hf_moe_inputs(layer, rope, R, pos):
    """transformers' MoE input X and routing for one sequence's residual streams R [T, n, D] (fp32)."""
    got = {}
    layer.mlp.register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0][0].clone()))
    layer.mlp.gate.register_forward_hook(lambda m, a, o: got.__setitem__("gate", o))
    from transformers.masking_utils import create_sliding_window_causal_mask

    pids = pos[None]
    # transformers' own sliding-window mask (its window semantics, not ours)
    mask = create_sliding_window_causal_mask(config=layer.self_attn.config, inputs_embeds=R[None, :, 0],
                                             attention_mask=None, past_key_values=None, position_ids=pids,
                                             allow_is_causal_skip=False)
    assert mask is not None and mask.shape[-1] == R.shape[0]
    pe = {k: rope(R, position_ids=pids, layer_type=k) for k in ("main", "compress")}
    with torch.no_grad():
        layer(R[None], position_embeddings=pe, position_ids=pids, attention_mask=mask)
    _, w, ids = got["gate"]
    order = ids.argsort(-1)
    return got["x"], ids.gather(1, order), w.gather(1, order)


def _sorted(ids, w):
    order = ids.argsort(-1)
    return ids.gather(1, order), w.gather(1, order)


@pytest.mark.parametrize("window", [16, 128])
def test_full_mode_equals_transformers_decoder_layer(ckpt, blocks, window):
    """Two sequences longer than the window, replayed together; each equals transformers' layer
    run on that sequence alone (so the block also keeps sequences apart)."""
    lens = [150, 40] if window == 128 else [70, 33]
    layer, rope = _hf_layer(ckpt, window)
    for dtype, block in blocks.items():
        block = _with_window(block, window)
        hidden, tok, pos = _rows(block, lens)
        X, ids, w = block.moe_inputs(hidden, tok, pos, "full", lens)
        ids, w = _sorted(ids, w)
        assert X.dtype == dtype and ids.dtype == torch.int64 and w.dtype == torch.float32
        ref_block = blocks[torch.float32]
        R = ref_block.project_inputs(hidden, tok, pos)          # the block's inputs, fp32
        start = 0
        for n in lens:
            sl = slice(start, start + n)
            hx, hids, hw = _hf_moe_inputs(layer, rope, R[sl], pos[sl])
            start += n
            if dtype == torch.float32:
                assert (X[sl] - hx).abs().max().item() < FP32_ATOL
                assert torch.equal(ids[sl], hids)
                torch.testing.assert_close(w[sl], hw, atol=1e-5, rtol=1e-5)
            else:
                rel = ((X[sl].float() - hx).norm() / hx.norm()).item()
                assert rel < BF16_REL, rel
                agree = (ids[sl] == hids).all(-1).float().mean().item()
                assert agree > 0.9, agree
        assert torch.allclose(w.sum(-1), torch.full((sum(lens),), 1.5), atol=1e-5)


def _with_window(block, window):
    """A shallow copy of the block with another attention window (the module fixture stays as loaded)."""
    other = copy.copy(block)
    other.dims = dataclasses.replace(block.dims, window=window)
    return other


def test_full_mode_differs_from_identity_and_attention_reaches_back(blocks):
    """Attention is real: changing a row 10 positions back changes X (window 128) in full mode only."""
    block = _with_window(blocks[torch.float32], 128)
    hidden, tok, pos = _rows(block, [40], seed=3)
    X, _, _ = block.moe_inputs(hidden, tok, pos, "full", [40])
    Xi, _, _ = block.moe_inputs(hidden, tok, pos, "identity")
    assert (X - Xi).abs().max() > 1e-2
    h2 = hidden.clone()
    h2[20] = -h2[20]
    X2, _, _ = block.moe_inputs(h2, tok, pos, "full", [40])
    assert torch.equal(X2[:20], X[:20])                         # causal
    assert (X2[30] - X[30]).abs().max() > 1e-4                  # row 30 sees row 20
    Xi2, _, _ = block.moe_inputs(h2, tok, pos, "identity")
    assert torch.equal(Xi2[30], Xi[30])                         # identity: rows independent


def _reference_identity_row(W, emb_row, h_row, p, c):
    """One row, float64, from the equations: mask, norms, projections, skipped attention,
    ffn hc_pre with Sinkhorn, ffn_norm, gate."""
    d = {k: v.double() for k, v in W.items()}
    n, D, eps = c["hc_mult"], c["hidden_size"], c["rms_norm_eps"]

    def rms(v, w):
        return v / math.sqrt(float((v * v).mean()) + eps) * (w if w is not None else 1.0)

    e = torch.zeros(D, dtype=torch.float64) if p == 0 else emb_row.double()
    e = rms(e, d["enorm.weight"]) if p != 0 else e
    R = torch.stack([d["h_proj.weight"] @ rms(h_row.double()[i * D:(i + 1) * D], d["hnorm.weight"])
                     + d["e_proj.weight"] @ e for i in range(n)])
    r = R.reshape(-1)
    mix = (d["hc_ffn_fn"] @ r) / math.sqrt(float((r * r).mean()) + eps)
    s, b = d["hc_ffn_scale"], d["hc_ffn_base"]
    pre = 1 / (1 + torch.exp(-(mix[:n] * s[0] + b[:n]))) + c["hc_eps"]
    x = sum(pre[i] * R[i] for i in range(n))
    X = rms(x, d["ffn_norm.weight"])
    logits = d["ffn.gate.weight"] @ X
    scores = torch.log1p(torch.exp(logits)).sqrt()
    top = sorted(range(len(scores)), key=lambda j: -float(scores[j] + d["ffn.gate.bias"][j]))[:c["num_experts_per_tok"]]
    g = scores[top] / scores[top].sum() * c["routed_scaling_factor"]
    return X, sorted(top), g[torch.tensor(top).argsort()]


def test_identity_mode_equals_hand_computed_rows(ckpt, blocks):
    import json

    c = json.loads((ckpt / "config.json").read_text())
    W = load_mtp_weights(ckpt, "mtp.0.")
    hidden, tok, pos = _rows(blocks[torch.float32], [6], seed=5)
    for dtype, block in blocks.items():
        X, ids, w = block.moe_inputs(hidden, tok, pos, "identity")
        ids, w = _sorted(ids, w)
        for t in (0, 1, 5):                                   # position 0: embedding masked
            rX, rids, rg = _reference_identity_row(W, block.embed[tok[t]].float(), hidden[t].float(), int(pos[t]), c)
            if dtype == torch.float32:
                assert (X[t].double() - rX).abs().max() < 1e-4
                assert ids[t].tolist() == rids
                assert torch.allclose(w[t].double(), rg, atol=1e-5)
            else:
                assert ((X[t].double() - rX).norm() / rX.norm()) < BF16_REL


def test_bad_inputs_are_named(blocks):
    block = blocks[torch.bfloat16]
    hidden, tok, pos = _rows(block, [5])
    with pytest.raises(ValueError, match="seq_lens"):
        block.moe_inputs(hidden, tok, pos, "full")
    with pytest.raises(ValueError, match="not consecutive"):
        block.moe_inputs(hidden, tok, torch.tensor([0, 1, 2, 4, 5]), "full", [5])
    with pytest.raises(ValueError, match="vocabulary"):
        block.moe_inputs(hidden, tok + 10**6, pos, "identity")
    with pytest.raises(ValueError, match="mode"):
        block.moe_inputs(hidden, tok, pos, "zero")
    with pytest.raises(ValueError, match=r"\[T, 4\*512\]"):
        block.moe_inputs(hidden[:, :100], tok, pos, "identity")

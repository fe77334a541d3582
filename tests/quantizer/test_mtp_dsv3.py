"""DeepSeek-V3 MTP block (quantizer/mtp/dsv3.py) on the tiny DSV3 fixture, against transformers'
DeepseekV3DecoderLayer run on eh_proj's output with the fixture's MTP-layer weights: full-mode
expert inputs and top-k, with plain RoPE and with DeepSeek-V3's YaRN settings. The fixture's
random attention is near-uniform (logits std ~0.07, RoPE barely matters), so the MTP layer's
q/kv projections are sharpened (logits std ~3) to make attention — and RoPE — count.
Also: group-limited routing vs transformers' router, identity mode, batching independence,
expert stacking, bad input."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from requant.quantizer.mtp.arch import load_block, load_spec
from requant.quantizer.mtp.common import rms_norm
from requant.quantizer.mtp.dsv3 import DSV3Block, DSV3Rope
from requant.quantizer.mtp.weights import load_mtp_weights

# DeepSeek-V3/R1's config.json rope settings
YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
SEQ_LENS = [37, 5, 64]


def sharpen_mtp_attention(src, dst, scale: float = 6.0, rope_scale: float = 12.0, zero_q_rope: bool = False):
    """Copy checkpoint ``src`` to ``dst`` with the MTP layer's attention logits made O(1):
    q_b_proj and kv_b_proj × scale, the rope key rows of kv_a_proj_with_mqa × rope_scale
    (``zero_q_rope``: the queries' rope rows zeroed instead, so RoPE contributes nothing)."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    c = json.loads((dst / "config.json").read_text())
    H, nd, rd, kvr = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["kv_lora_rank"]
    p = f"model.layers.{c['num_hidden_layers']}.self_attn."
    sd = load_file(str(src / "model.safetensors"))
    qb = sd[p + "q_b_proj.weight"].float().view(H, nd + rd, -1) * scale
    if zero_q_rope:
        qb[:, nd:] = 0
    sd[p + "q_b_proj.weight"] = qb.reshape(H * (nd + rd), -1).bfloat16()
    sd[p + "kv_b_proj.weight"] = (sd[p + "kv_b_proj.weight"].float() * scale).bfloat16()
    kva = sd[p + "kv_a_proj_with_mqa.weight"].float()
    kva[kvr:] *= 1.0 if zero_q_rope else rope_scale
    sd[p + "kv_a_proj_with_mqa.weight"] = kva.bfloat16()
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def ckpt(tiny_dsv3, tmp_path_factory):
    return sharpen_mtp_attention(tiny_dsv3, tmp_path_factory.mktemp("dsv3") / "sharp")


@pytest.fixture(scope="module")
def parts(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    spec = load_spec(config)
    return config, spec, load_mtp_weights(ckpt, prefix=spec.prefix)


@pytest.fixture(scope="module")
def rows(parts):
    """Store-like rows: whole sequences, positions 0..L-1, final-hidden-like states."""
    config = parts[0]
    g = torch.Generator().manual_seed(1)
    T = sum(SEQ_LENS)
    hidden = (torch.randn(T, config["hidden_size"], generator=g) * 2).bfloat16()
    tok = torch.randint(0, config["vocab_size"], (T,), generator=g)
    pos = torch.cat([torch.arange(n) for n in SEQ_LENS])
    return hidden, tok, pos


def hf_layer(config: dict, weights: dict):
    """transformers' DeepseekV3DecoderLayer (fp32, eager attention) with the MTP layer's weights."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RotaryEmbedding

    cfg = DeepseekV3Config(**{k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")})
    cfg._attn_implementation = "eager"
    n = config["num_hidden_layers"]
    layer = DeepseekV3DecoderLayer(cfg, layer_idx=n).float().eval()
    E = config["n_routed_experts"]
    sd = {k: v.float() for k, v in weights.items()
          if k.startswith(("input_layernorm", "post_attention_layernorm", "self_attn.", "mlp.gate.", "mlp.shared_experts."))}
    sd["mlp.experts.gate_up_proj"] = torch.stack(
        [torch.cat([weights[f"mlp.experts.{e}.gate_proj.weight"], weights[f"mlp.experts.{e}.up_proj.weight"]])
         for e in range(E)]).float()
    sd["mlp.experts.down_proj"] = torch.stack([weights[f"mlp.experts.{e}.down_proj.weight"] for e in range(E)]).float()
    layer.load_state_dict(sd, strict=True)
    return layer, DeepseekV3RotaryEmbedding(cfg)


def hf_moe_inputs(config, weights, x: torch.Tensor, pos: torch.Tensor, seq_lens: list[int]):
    """transformers' MoE input, router top-k ids and weights for eh_proj outputs x [T, H] (fp32)."""
    layer, rotary = hf_layer(config, weights)
    got = {}
    layer.mlp.register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0]))
    layer.mlp.gate.register_forward_hook(lambda m, a, out: got.__setitem__("route", out))
    X, ids, w = [], [], []
    start = 0
    with torch.no_grad():
        for n in seq_lens:
            xs, ps = x[start:start + n][None], pos[start:start + n][None]
            mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
            layer(xs, attention_mask=mask, position_ids=ps, position_embeddings=rotary(xs, ps))
            X.append(got["x"][0])
            ids.append(got["route"][2])
            w.append(got["route"][1])
            start += n
    return torch.cat(X), torch.cat(ids), torch.cat(w)


def _rel(a, b):
    return ((a.float() - b.float()).norm(dim=-1) / b.float().norm(dim=-1))


def _same_sets(a, b):
    return (a.sort(-1).values == b.sort(-1).values).all(-1)


@pytest.mark.parametrize("rope", ["default", "yarn"])
def test_full_mode_matches_transformers_decoder_layer(parts, rows, rope):
    config, spec, weights = parts
    if rope == "yarn":
        config = {**config, "rope_scaling": YARN, "max_position_embeddings": 163840}
    hidden, tok, pos = rows
    b32 = DSV3Block.from_config(spec, config, weights, device="cpu", dtype=torch.float32)
    x = b32.project_inputs(hidden, tok, pos)
    X_ref, ids_ref, w_ref = hf_moe_inputs(config, weights, x, pos, SEQ_LENS)

    X, ids, w = b32.moe_inputs(hidden, tok, pos, "full", SEQ_LENS)
    err = _rel(X, X_ref)
    assert err.max() < 1e-5, f"fp32 full mode vs transformers: max rel {err.max():.2e}"  # measured 1.2e-6 / 1.5e-6 (yarn)
    assert bool(_same_sets(ids, ids_ref).all())
    order, order_ref = ids.argsort(-1), ids_ref.argsort(-1)
    torch.testing.assert_close(w.gather(1, order), w_ref.gather(1, order_ref), rtol=1e-5, atol=1e-6)

    # bf16 (the replay's precision) vs the fp32 reference
    b16 = DSV3Block.from_config(spec, config, weights, device="cpu")
    X16, ids16, _ = b16.moe_inputs(hidden, tok, pos, "full", SEQ_LENS)
    assert X16.dtype == torch.bfloat16
    err16 = _rel(X16, X_ref)
    Xi = b32.moe_inputs(hidden, tok, pos, "identity")[0]
    print(f"\n[{rope}] fp32 max rel {err.max():.2e}; bf16 mean {err16.mean():.2e} max {err16.max():.2e} "
          f"top-k agree {_same_sets(ids16, ids_ref).float().mean():.3f}; identity mean rel {_rel(Xi, X_ref).mean():.2f}")
    assert err16.mean() < 1.5e-2 and err16.max() < 4e-2, f"bf16: mean {err16.mean():.2e} max {err16.max():.2e}"
    assert _same_sets(ids16, ids_ref).float().mean() >= 0.95

    # attention matters here: identity mode is far from the real block
    assert _rel(Xi, X_ref).mean() > 0.3


def test_rope_matters_and_yarn_differs(parts, rows):
    """The checks above would not notice a wrong RoPE unless RoPE changes the result."""
    config, spec, weights = parts
    hidden, tok, pos = rows
    plain = DSV3Block.from_config(spec, config, weights, device="cpu", dtype=torch.float32)
    yarn = DSV3Block.from_config(spec, {**config, "rope_scaling": YARN}, weights, device="cpu", dtype=torch.float32)
    none = DSV3Block.from_config(spec, config, weights, device="cpu", dtype=torch.float32)
    none._inv_freq = torch.zeros_like(none._inv_freq)
    X = plain.moe_inputs(hidden, tok, pos, "full", SEQ_LENS)[0]
    assert _rel(none.moe_inputs(hidden, tok, pos, "full", SEQ_LENS)[0], X).mean() > 0.05
    assert _rel(yarn.moe_inputs(hidden, tok, pos, "full", SEQ_LENS)[0], X).mean() > 0.05


def test_yarn_parameters():
    r = DSV3Rope.from_config({"rope_theta": 10000.0, "rope_scaling": YARN})
    m = 0.1 * torch.log(torch.tensor(40.0)).item() + 1.0
    assert r.softmax_scale_factor() == pytest.approx(m * m) and r.cos_sin_scale() == pytest.approx(1.0)
    f, base = r.inv_freq(64), 1.0 / 10000.0 ** (torch.arange(0, 64, 2) / 64)
    # correction range for DSV3's settings: pairs ≤ 10 keep their frequency, pairs ≥ 23 are
    # interpolated (÷ factor), a linear ramp in between
    torch.testing.assert_close(f[:11], base[:11])
    torch.testing.assert_close(f[23:], base[23:] / 40)
    assert (f[11:23] < base[11:23]).all() and (f[11:23] > base[11:23] / 40).all()
    # transformers ≥ 5 writes rope_parameters instead
    assert DSV3Rope.from_config({"rope_parameters": {**YARN, "rope_type": "yarn", "rope_theta": 10000.0}}) == r
    assert DSV3Rope.from_config({"rope_parameters": {"rope_type": "default", "rope_theta": 5e4}}).theta == 5e4


def test_identity_mode_is_post_attention_norm_of_eh_proj(parts, rows):
    config, spec, weights = parts
    hidden, tok, pos = rows
    b32 = DSV3Block.from_config(spec, config, weights, device="cpu", dtype=torch.float32)
    layer, _ = hf_layer(config, weights)
    x = b32.project_inputs(hidden, tok, pos)
    # eh_proj input order: [enorm(embedding), hnorm(hidden)], embedding zeroed at position 0
    e = weights["embed_tokens.weight"].float()[tok] * (pos != 0)[:, None]
    rms = lambda t, w: t * torch.rsqrt(t.square().mean(-1, keepdim=True) + 1e-6) * w.float()  # noqa: E731
    cat = torch.cat([rms(e, weights["enorm.weight"]), rms(hidden.float(), weights["hnorm.weight"])], -1)
    torch.testing.assert_close(x, cat @ weights["eh_proj.weight"].float().T, rtol=1e-5, atol=1e-5)
    X, ids, w = b32.moe_inputs(hidden, tok, pos, "identity")
    with torch.no_grad():
        torch.testing.assert_close(X, layer.post_attention_layernorm(x), rtol=1e-5, atol=1e-6)
        _, w_ref, ids_ref = layer.mlp.gate(X)
    assert bool(_same_sets(ids, ids_ref).all())
    # identity rows are independent: any order / subset gives the same rows
    b16 = DSV3Block.from_config(spec, config, weights, device="cpu")
    perm = torch.randperm(len(pos), generator=torch.Generator().manual_seed(0))[:50]
    Xa = b16.moe_inputs(hidden, tok, pos, "identity")[0]
    Xb = b16.moe_inputs(hidden[perm], tok[perm], pos[perm], "identity")[0]
    assert torch.equal(Xa[perm], Xb)


def test_full_mode_sequences_do_not_interact(parts, rows):
    config, spec, weights = parts
    hidden, tok, pos = rows
    b = DSV3Block.from_config(spec, config, weights, device="cpu")
    X, ids, w = b.moe_inputs(hidden, tok, pos, "full", SEQ_LENS)
    a = SEQ_LENS[0]
    X1, ids1, w1 = b.moe_inputs(hidden[:a], tok[:a], pos[:a], "full", [a])
    X2 = b.moe_inputs(hidden[a:], tok[a:], pos[a:], "full", SEQ_LENS[1:])[0]
    assert torch.equal(torch.cat([X1, X2]), X) and torch.equal(ids1, ids[:a])
    # query blocking does not change a sequence's rows (beyond fp32 summation order)
    b32 = DSV3Block.from_config(spec, config, weights, device="cpu", dtype=torch.float32)
    xa = rms_norm(b32.project_inputs(hidden[:a], tok[:a], pos[:a]), b32.W["input_layernorm.weight"], 1e-6)
    one = b32.attention(xa, pos[:a], [0, a])
    three = b32.attention(xa, pos[:a], [0, a], score_bytes=4 * config["num_attention_heads"] * a * 3)  # 3-row blocks
    torch.testing.assert_close(three, one, rtol=1e-5, atol=1e-5)


def test_group_limited_routing_matches_transformers_router(parts):
    """n_group 4 / topk_group 2 (DeepSeek-V3 uses 8 / 4): the groups ranked by their two best
    biased scores, experts picked inside the kept groups only."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config, spec, weights = parts
    config = {**config, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 3}
    g = torch.Generator().manual_seed(3)
    E, H = config["n_routed_experts"], config["hidden_size"]
    weights = {**weights, "mlp.gate.weight": (torch.randn(E, H, generator=g) * 0.1).bfloat16(),
               "mlp.gate.e_score_correction_bias": torch.randn(E, generator=g) * 0.3}
    b = DSV3Block.from_config(spec, config, weights, device="cpu")
    X = torch.randn(500, H, generator=g).bfloat16()
    ids, w = b.route(X)
    router = DeepseekV3TopkRouter(DeepseekV3Config(**{k: v for k, v in config.items() if k != "architectures"}))
    router.weight.data = weights["mlp.gate.weight"].float()
    router.e_score_correction_bias.data = weights["mlp.gate.e_score_correction_bias"].float()
    with torch.no_grad():
        _, w_ref, ids_ref = router(X.float())
    assert ids.dtype == torch.int64 and w.dtype == torch.float32 and ids.shape == (500, 3)
    assert bool(_same_sets(ids, ids_ref).all())
    torch.testing.assert_close(w.gather(1, ids.argsort(-1)), w_ref.gather(1, ids_ref.argsort(-1)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.sum(-1), torch.full((500,), config["routed_scaling_factor"]))
    # the group limit changes the choice for some rows (else this test would not test it)
    flat = DSV3Block.from_config(spec, {**config, "n_group": 1, "topk_group": 1}, weights, device="cpu").route(X)[0]
    assert not bool(_same_sets(ids, flat).all())


def test_load_block_and_expert_weights(ckpt, parts):
    config, spec, weights = parts
    b = load_block(ckpt, device="cpu")
    assert isinstance(b, DSV3Block) and b.spec == spec
    w1, w2, w3 = b.expert_weights()
    E, I, D = spec.n_experts, spec.moe_inter, spec.hidden
    assert w1.shape == (E, I, D) and w2.shape == (E, D, I) and w3.shape == (E, I, D)
    assert w1.dtype == torch.bfloat16 and w1.device.type == "cpu"
    for e in (0, E - 1):
        for proj, t in (("w1", w1), ("w2", w2), ("w3", w3)):
            assert torch.equal(t[e], weights[spec.expert_name(e, proj).removeprefix(spec.prefix) + ".weight"])


def test_bad_input(parts, rows):
    config, spec, weights = parts
    hidden, tok, pos = rows
    broken = {k: v for k, v in weights.items()
              if k not in ("self_attn.kv_b_proj.weight", "mlp.experts.3.up_proj.weight")}
    with pytest.raises(ValueError, match=r"missing model\.layers\.2\.self_attn\.kv_b_proj\.weight, "
                                         r"model\.layers\.2\.mlp\.experts\.3\.up_proj\.weight"):
        DSV3Block.from_config(spec, config, broken, device="cpu")
    no_embed = {k: v for k, v in weights.items() if k != "embed_tokens.weight"}
    with pytest.raises(ValueError, match="embed_tokens"):
        DSV3Block.from_config(spec, config, no_embed, device="cpu")
    with pytest.raises(ValueError, match="unsupported rope scaling 'longrope'"):
        DSV3Block.from_config(spec, {**config, "rope_scaling": {"type": "longrope"}}, weights, device="cpu")
    with pytest.raises(ValueError, match="lacks 'kv_lora_rank'"):
        DSV3Block.from_config(spec, {k: v for k, v in config.items() if k != "kv_lora_rank"}, weights, device="cpu")
    b = DSV3Block.from_config(spec, config, weights, device="cpu")
    with pytest.raises(ValueError, match=r"\[T, 256\]"):
        b.moe_inputs(torch.zeros(4, 512, dtype=torch.bfloat16), tok[:4], pos[:4], "identity")
    with pytest.raises(ValueError, match="'identity' or 'full'"):
        b.moe_inputs(hidden, tok, pos, "attention")
    with pytest.raises(ValueError, match="needs seq_lens"):
        b.moe_inputs(hidden, tok, pos, "full")
    with pytest.raises(ValueError, match="do not cover"):
        b.moe_inputs(hidden, tok, pos, "full", [10, 10])
    gap = pos.clone()
    gap[3] = 7
    with pytest.raises(ValueError, match="not consecutive within sequence 0"):
        b.moe_inputs(hidden, tok, gap, "full", SEQ_LENS)
    v32 = DSV3Block.from_config(spec, {**config, "index_topk": 40}, weights, device="cpu")
    with pytest.raises(ValueError, match=r"index_topk 40\).*got one of 64"):
        v32.moe_inputs(hidden, tok, pos, "full", SEQ_LENS)
    a = SEQ_LENS[0]
    assert torch.equal(v32.moe_inputs(hidden[:a], tok[:a], pos[:a], "full", [a])[0],
                       b.moe_inputs(hidden[:a], tok[:a], pos[:a], "full", [a])[0])
    with pytest.raises(ValueError, match="vocabulary"):
        b.moe_inputs(hidden[:2], torch.tensor([0, 10 ** 6]), pos[:2], "identity")

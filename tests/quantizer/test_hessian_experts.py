"""Hessian accumulation, merging, serialisation, and the expert pipeline's policies."""
import pytest
import torch

from requant.quantizer.core.experts import ExpertQuantConfig, quantize_experts
from requant.quantizer.core.hessian import HessianSet, swiglu_intermediate
from requant.quantizer.core.pack import unpack_int32
from requant.quantizer.core.quant import QuantSpec, dequantize

E, D, I = 6, 256, 128


def routed_batch(seed, tokens=300, k=2):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, D, generator=g) @ torch.randn(D, D, generator=g)).bfloat16()
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(tokens)])  # expert E-1 never routed
    return x, ids


def test_hessian_matches_dense_per_expert_sum():
    x, ids = routed_batch(0)
    hs = HessianSet(E, D)
    hs.add(x, ids)
    xf = x.double()
    for e in range(E):
        sel = (ids == e).any(1)
        ref = xf[sel].T @ xf[sel]
        assert hs.count[e] == int(sel.sum())
        assert torch.allclose(hs.h[e].double(), ref, rtol=1e-5, atol=1e-3 * ref.abs().max().item() * 1e-3)


def test_partial_hessians_merge_to_one_shot(tmp_path):
    batches = [routed_batch(s) for s in range(4)]
    one = HessianSet(E, D)
    for x, ids in batches:
        one.add(x, ids)
    a, b = HessianSet(E, D), HessianSet(E, D)
    for x, ids in batches[:2]:
        a.add(x, ids)
    for x, ids in batches[2:]:
        b.add(x, ids)
    a.save(tmp_path / "a.safetensors")
    merged = HessianSet.load(tmp_path / "a.safetensors").merge_(b)
    assert torch.equal(merged.count, one.count)
    assert torch.allclose(merged.h, one.h, rtol=1e-6, atol=1e-3)


def test_expert_parallel_subset_keeps_only_its_experts():
    x, ids = routed_batch(1)
    full, part = HessianSet(E, D), HessianSet(E, D, experts=torch.tensor([1, 3]))
    full.add(x, ids)
    part.add(x, ids)
    assert torch.equal(part.h, full.h[[1, 3]]) and torch.equal(part.count, full.count[[1, 3]])


@pytest.mark.parametrize("bad, msg", [
    (lambda x, ids: (x[:, :-1], ids), "activations must be"),
    (lambda x, ids: (x, ids[:-1]), "rows of expert ids"),
    (lambda x, ids: (x, ids + E), "expert id outside"),
    (lambda x, ids: (x.float().index_fill(0, torch.tensor([3]), float("nan")), ids), "non-finite"),
])
def test_hessian_bad_input(bad, msg):
    x, ids = routed_batch(2)
    with pytest.raises(ValueError, match=msg):
        HessianSet(E, D).add(*bad(x, ids))


def test_hessian_load_refuses_foreign_file(tmp_path):
    from safetensors.torch import save_file
    save_file({"h": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a requant Hessian file"):
        HessianSet.load(tmp_path / "x.safetensors")


def test_swiglu_clamp():
    x = torch.ones(1, 2)
    w = torch.full((1, 2), 100.0)
    out = swiglu_intermediate(x, w, w, limit=10.0)
    assert out.item() == pytest.approx(torch.nn.functional.silu(torch.tensor(10.0)).item() * 10.0)


def test_quantize_experts_end_to_end_with_zero_token_policy():
    g = torch.Generator().manual_seed(3)
    w1 = (torch.randn(E, I, D, generator=g) * 0.05).bfloat16()
    w3 = (torch.randn(E, I, D, generator=g) * 0.05).bfloat16()
    w2 = (torch.randn(E, D, I, generator=g) * 0.05).bfloat16()
    h_in, h_mid = HessianSet(E, D), HessianSet(E, I)
    for s in range(3):
        x, ids = routed_batch(10 + s)
        h_in.add(x, ids)
        for e in range(E):
            sel = (ids == e).any(1)
            if sel.any():
                h_mid.add(swiglu_intermediate(x[sel].float(), w1[e].float(), w3[e].float(), 10.0),
                          torch.full((int(sel.sum()),), e))
    tensors, records = quantize_experts(w1, w2, w3, h_in, h_mid, ExpertQuantConfig(batch_size=4))
    assert len(records) == 3 * E and len(tensors) == 9 * E
    by = {(r.expert, r.proj): r for r in records}
    for e in range(E - 1):
        for p in ("w1", "w2", "w3"):
            r = by[(e, p)]
            assert r.path == "gptq" and r.tokens > 0
            assert 0 < r.err_gptq < r.err_rtn
    for p in ("w1", "w2", "w3"):  # expert E-1 was never routed: RTN, flagged, no NaN
        r = by[(E - 1, p)]
        assert r.path == "rtn_zero_tokens" and r.tokens == 0 and r.err_gptq is None
    name = "mtp.0.ffn.experts.2.w2"
    q = unpack_int32(tensors[f"{name}.weight_packed"])
    wq = dequantize(q, tensors[f"{name}.weight_scale"], QuantSpec())
    assert tensors[f"{name}.weight_shape"].tolist() == [D, I]
    assert torch.isfinite(wq).all()
    assert (wq - w2[2].float()).abs().max() < 0.1
    for t in tensors.values():
        assert torch.isfinite(t.float()).all()


def test_quantize_experts_shape_errors():
    w = torch.zeros(E, I, D)
    with pytest.raises(ValueError, match="expert shapes disagree"):
        quantize_experts(w, torch.zeros(E, I, D), w, HessianSet(E, D), HessianSet(E, I))
    with pytest.raises(ValueError, match="Hessian dims"):
        quantize_experts(w, torch.zeros(E, D, I), w, HessianSet(E, I), HessianSet(E, D))

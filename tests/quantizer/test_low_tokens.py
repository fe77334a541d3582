"""Low-token GPTQ policies (``LowTokenPolicy``): ``damp`` is plain GPTQ bit for bit; each option
does what it says; the default is ``shrink`` (chosen on the trained model's captures:
benchmarks/quality_study.py), whose pooled Hessian the stage sums on a fixed-point grid; and on
under-covered experts of a synthetic with shared input structure the regularising ones beat the
fixed damp on fresh (held-out) tokens."""
import pytest
import torch

from requant.quantizer.core.experts import ExpertQuantConfig, LowTokenPolicy, pooled_hessian, quantize_experts
from requant.quantizer.core.gptq import GPTQConfig, gptq_batched, relative_output_error
from requant.quantizer.core.hessian import HessianSet
from requant.quantizer.core.pack import packed_tensors, unpack_int32
from requant.quantizer.core.quant import QuantSpec, dequantize, rtn

from .test_gptq import problem

SPEC = QuantSpec()
D, I = 128, 128
TOKENS = [16, 40, 1500, 3000]          # T/D = 0.12, 0.31, 12, 23


def inputs(g, n, mix, own):
    return (torch.randn(n, D, generator=g) @ (mix + own)).bfloat16().float()


@pytest.fixture(scope="module")
def experts():
    """Experts whose inputs share one correlated structure (plus a little of their own), with
    the calibration token counts above, and fresh held-out inputs per expert."""
    g = torch.Generator().manual_seed(11)
    mix = torch.randn(D, D, generator=g) * torch.logspace(0, -3, D)[None, :]
    E = len(TOKENS)
    own = [torch.randn(D, D, generator=g) * 0.05 * torch.logspace(0, -3, D)[None, :] for _ in range(E)]
    w1, w3 = (torch.randn(E, I, D, generator=g) * 0.03 for _ in range(2))
    w2 = torch.randn(E, D, I, generator=g) * 0.03
    h_in, h_mid = HessianSet(E, D), HessianSet(E, I)
    fresh_in, fresh_mid = [], []
    for e, n in enumerate(TOKENS):
        for hs, acc, m in ((h_in, fresh_in, None), (h_mid, fresh_mid, e)):
            x = inputs(g, n, mix, own[e])
            xf = inputs(g, 8000, mix, own[e])
            if m is not None:  # intermediates: a fixed random map of the input, same for calibration and fresh
                x, xf = (torch.nn.functional.silu(v @ w1[e].T) * (v @ w3[e].T) for v in (x, xf))
            hs.add(x, torch.full((n,), e))
            acc.append(xf.T @ xf / xf.shape[0])
    return w1, w2, w3, h_in, h_mid, torch.stack(fresh_in), torch.stack(fresh_mid)


def run(experts, policy=LowTokenPolicy("damp"), **kw):
    w1, w2, w3, h_in, h_mid, *_ = experts
    return quantize_experts(w1, w2, w3, h_in, h_mid, ExpertQuantConfig(batch_size=4, low_tokens=policy), **kw)


def heldout_errors(experts, tensors) -> torch.Tensor:
    """[E, 2]: held-out relative output error of w1|w3 (fresh inputs) and w2 (fresh intermediates)."""
    w1, w2, w3, _, _, f_in, f_mid = experts
    out = []
    for e in range(w1.shape[0]):
        deq = {p: dequantize(unpack_int32(tensors[f"mtp.0.ffn.experts.{e}.{p}.weight_packed"]),
                             tensors[f"mtp.0.ffn.experts.{e}.{p}.weight_scale"], SPEC) for p in ("w1", "w2", "w3")}
        a = relative_output_error(torch.cat([w1[e], w3[e]])[None], torch.cat([deq["w1"], deq["w3"]])[None],
                                  f_in[e:e + 1])
        b = relative_output_error(w2[e][None], deq["w2"][None], f_mid[e:e + 1])
        out.append(torch.cat([a, b]))
    return torch.stack(out)


def test_per_entry_damp_equal_to_the_scalar_is_bit_identical():
    w, h = problem(20)
    cfg = GPTQConfig()
    a = gptq_batched(w, h, cfg)
    b = gptq_batched(w, h, cfg, damp=torch.full((w.shape[0],), cfg.damp, dtype=torch.float64))
    assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale) and torch.equal(a.damp, b.damp)
    assert a.path == b.path


def test_per_entry_damp_retries_each_entry_from_its_own_damp():
    w, h = problem(21, b=3)
    h[1] = -torch.eye(h.shape[-1])                               # never PD: RTN fallback
    v = torch.randn(h.shape[-1], 2, dtype=torch.float64)
    h[2] = (v @ v.T).float() - 1e-3 * torch.eye(h.shape[-1])    # PD only after enough damp
    res = gptq_batched(w, h, GPTQConfig(damp_max=1.0), damp=torch.tensor([0.05, 0.05, 1e-6], dtype=torch.float64))
    assert res.path == ["gptq", "rtn_fallback", "gptq_damp_retry"]
    assert res.damp[0] == 0.05 and torch.isnan(res.damp[1]) and 1e-6 < res.damp[2] <= 1.0
    with pytest.raises(ValueError, match="damp must be"):
        gptq_batched(w, h, damp=torch.zeros(2))


def test_default_policy_is_shrink():
    from requant.quantizer.stage.run import QuantizeJob

    assert LowTokenPolicy().kind == "shrink" and ExpertQuantConfig().low_tokens == LowTokenPolicy("shrink")
    job = QuantizeJob(stores=["s"], master="m", base="b", out="o")
    assert job.low_token_policy == LowTokenPolicy("shrink")
    with pytest.raises(ValueError, match="low-token policy must be one of"):
        QuantizeJob(stores=["s"], master="m", base="b", out="o", low_tokens="magic")


def test_stage_pooled_hessian_is_the_pooled_mean_in_any_slicing(experts):
    """The stage's pooled Hessian (integer sums of each expert's rounded Hessian) equals
    Σ_e H_e / Σ_e T_e to fp32 precision, and slices of experts summed give the same bits."""
    from requant.quantizer.stage.worker import pooled_means
    from requant.quantizer.core.hessian import pool_shift, pooled_sum

    _, _, _, h_in, h_mid, *_ = experts
    rows = int(h_in.count.sum())
    shifts = tuple(pool_shift(torch.full((4,), float(h.h.abs().amax())), rows) for h in (h_in, h_mid))
    whole = pooled_means([tuple(pooled_sum(h, s) for h, s in zip((h_in, h_mid), shifts))], shifts, rows)
    halves = []
    for ids in ([0, 1], [2, 3]):
        part = []
        for h, s in zip((h_in, h_mid), shifts):
            sl = HessianSet(4, h.dim, experts=torch.tensor(ids))
            sl.h, sl.count = h.h[ids].clone(), h.count[ids].clone()
            part.append(pooled_sum(sl, s))
        halves.append(tuple(part))
    split = pooled_means(halves, shifts, rows)
    for a, b, h in zip(whole, split, (h_in, h_mid)):
        assert torch.equal(a, b)
        assert torch.allclose(a, pooled_hessian(h), rtol=1e-5, atol=1e-6 * float(pooled_hessian(h).abs().max()))


def test_damp_policy_is_plain_gptq_on_each_experts_own_hessian(experts):
    w1, w2, w3, h_in, h_mid, *_ = experts
    tensors, records = run(experts)
    ref_in = gptq_batched(torch.cat([w1, w3], 1), h_in.mean(), GPTQConfig())
    ref_mid = gptq_batched(w2, h_mid.mean(), GPTQConfig())
    for e in range(w1.shape[0]):
        want = packed_tensors("w1", ref_in.q[e, :I], ref_in.scale[e, :I], SPEC)
        want |= packed_tensors("w2", ref_mid.q[e], ref_mid.scale[e], SPEC)
        for p in ("w1", "w2"):
            for suffix in ("weight_packed", "weight_scale"):
                assert torch.equal(tensors[f"mtp.0.ffn.experts.{e}.{p}.{suffix}"], want[f"{p}.{suffix}"])
    assert {r.path for r in records} == {"gptq"} and {r.damp for r in records} == {0.01}


def test_token_damp_follows_the_token_count(experts):
    policy = LowTokenPolicy("token_damp", alpha=0.025)
    _, records = run(experts, policy)
    for r in records:
        dim = D if r.proj in ("w1", "w3") else I
        assert r.damp == pytest.approx(min(0.01 + 0.025 * dim / r.tokens, 1.0)) and r.path == "gptq"


def test_shrink_fits_the_blend_with_the_pooled_hessian(experts):
    _, _, _, h_in, _, *_ = experts
    pooled = pooled_hessian(h_in)
    assert torch.allclose(pooled, h_in.h.sum(0) / h_in.count.sum())
    mean = h_in.mean()
    fit = LowTokenPolicy("shrink").fit_hessian(mean, h_in.count, pooled)
    for e, n in enumerate(TOKENS):
        w = n / (n + D)
        assert torch.allclose(fit[e], w * mean[e] + (1 - w) * pooled, rtol=1e-5, atol=1e-7)


def test_shrink_needs_the_pooled_hessians_of_all_experts(experts):
    w1, w2, w3, h_in, h_mid, *_ = experts
    part = [HessianSet(h.num_experts, h.dim, experts=torch.tensor([0, 1])) for h in (h_in, h_mid)]
    for p, full in zip(part, (h_in, h_mid)):
        p.h, p.count = full.h[:2].clone(), full.count[:2].clone()
    cfg = ExpertQuantConfig(batch_size=4, low_tokens=LowTokenPolicy("shrink"))
    with pytest.raises(ValueError, match="pooled Hessians of all 4 experts"):
        quantize_experts(w1, w2, w3, *part, cfg)
    pooled = (pooled_hessian(h_in), pooled_hessian(h_mid))
    sliced, _ = quantize_experts(w1, w2, w3, *part, cfg, pooled=pooled)
    whole, _ = run(experts, LowTokenPolicy("shrink"))
    assert all(torch.equal(t, whole[k]) for k, t in sliced.items())   # a slice gives the whole run's experts


def test_rtn_below_threshold(experts):
    w1, w2, w3, *_ = experts
    tensors, records = run(experts, LowTokenPolicy("rtn_below", ratio=0.5))
    default, _ = run(experts)
    for r in records:
        dim = D if r.proj in ("w1", "w3") else I
        low = r.tokens < 0.5 * dim
        assert r.path == ("rtn_low_tokens" if low else "gptq") and (r.damp is None) == low
        key = f"mtp.0.ffn.experts.{r.expert}.{r.proj}.weight_packed"
        if low:
            w = {"w1": w1, "w2": w2, "w3": w3}[r.proj][r.expert]
            assert torch.equal(unpack_int32(tensors[key]), rtn(w[None], SPEC)[0][0])
        else:
            assert torch.equal(tensors[key], default[key])


def test_regularising_policies_beat_the_fixed_damp_on_fresh_tokens_of_under_covered_experts(experts):
    err = {k: heldout_errors(experts, run(experts, LowTokenPolicy(k))[0]) for k in ("damp", "token_damp", "shrink")}
    low = [i for i, n in enumerate(TOKENS) if n < D]
    for k in ("token_damp", "shrink"):
        assert (err[k][low] < err["damp"][low]).all(), (k, err)
    high = [i for i, n in enumerate(TOKENS) if n > 10 * D]
    assert (err["shrink"][high] < 1.05 * err["damp"][high]).all(), err  # and costs nothing with many tokens


def test_bad_policy_is_refused():
    with pytest.raises(ValueError, match="low-token policy must be one of"):
        LowTokenPolicy("magic")
    with pytest.raises(ValueError, match="≥ 0"):
        LowTokenPolicy("token_damp", alpha=-1)

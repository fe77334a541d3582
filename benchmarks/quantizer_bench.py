"""Quantizer-core benchmark at DeepSeek-V4-Flash MTP scale (256 experts × w1/w2/w3).

One run, same tensors, side by side:
  * Hessians: ours (bf16 inputs, fp32 accumulation, `HessianSet.add_segments`) vs the
    fp32 ``x.float().T @ x.float()`` recipe, and their relative difference;
  * GPTQ of the 768 tensors: ours (static groups, the default; plus variants) vs
    llm-compressor 0.14's batched ``quantize_weight`` (when importable), with the mean
    relative output error tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) of each, measured in full fp32.
Writes a JSON result. Run on a GPU (see benchmarks/README.md for the exact command);
``--small`` runs a reduced problem anywhere as a smoke test.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # many batch shapes
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _path import ensure_requant  # noqa: E402

ensure_requant()
from requant.quantizer.core.gptq import GPTQConfig, _prepare, gptq_batched  # noqa: E402
from requant.quantizer.core.experts import LowTokenPolicy, pooled_hessian  # noqa: E402
from requant.quantizer.core.hessian import HessianSet, swiglu_intermediate  # noqa: E402
from requant.quantizer.core.quant import QuantSpec, dequantize, group_scales, rtn  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def exact_rel_err(w, wq, h):
    """fp32 (no TF32) tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) per entry."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        w = w.float()
        dw = w - wq.float()
        num = (torch.bmm(dw, h) * dw).sum((-1, -2)).double()
        den = (torch.bmm(w, h) * w).sum((-1, -2)).double()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return (num / den).cpu()


def make_problem(a, dev):
    g = torch.Generator(device=dev).manual_seed(a.seed)
    gc = torch.Generator().manual_seed(a.seed)
    E, D, I = a.experts, a.dim, a.inter
    # Skewed per-expert counts like the seed's (min 430, mean ~11k, max ~175k).
    raw = torch.exp(torch.randn(E, generator=gc) * 1.25)
    counts = (raw / raw.mean() * a.mean_tokens).round().long().clamp(a.min_tokens, a.max_tokens)
    # Correlated, ill-conditioned activations: a decaying spectrum plus outlier channels.
    basis = torch.randn(D, D, generator=g, device=dev) / D ** 0.5 * torch.logspace(0, -3, D, device=dev)[None]
    outl = torch.randperm(D, generator=gc)[: D // 128].to(dev)
    scale_in = 4.0  # activations O(1) after the MTP's ffn_norm
    w1 = (torch.randn(E, I, D, generator=g, device=dev) * D ** -0.5).bfloat16()
    w3 = (torch.randn(E, I, D, generator=g, device=dev) * D ** -0.5).bfloat16()
    w2 = (torch.randn(E, D, I, generator=g, device=dev) * I ** -0.5).bfloat16()
    return counts, basis, outl, scale_in, w1, w2, w3, g


def expert_inputs(n, basis, outl, scale_in, g, dev):
    x = torch.randn(n, basis.shape[0], generator=g, device=dev).bfloat16() @ basis.T.bfloat16()
    x[:, outl] *= 20
    return (x * scale_in).bfloat16()


def bench_hessians(a, dev, counts, basis, outl, scale_in, w1, w3, g):
    E, D, I = a.experts, a.dim, a.inter
    h_in, h_mid = HessianSet(E, D, device=dev), HessianSet(E, I, device=dev)
    t_ours = t_ref = t_halves = 0.0
    hres_cfg = []
    for d in (D, I):  # compile the Triton kernels outside the timed region
        HessianSet(1, d, device=dev).add_segments(torch.ones(8, d, device=dev, dtype=torch.bfloat16),
                                                  torch.tensor([8]))
    max_rel = 0.0
    chunk = a.hessian_chunk
    for s in range(0, E, chunk):
        ids = list(range(s, min(s + chunk, E)))
        n = counts[ids]
        xs = torch.cat([expert_inputs(int(k), basis, outl, scale_in, g, dev) for k in n])
        mids, off = [], 0
        for e, k in zip(ids, n.tolist()):
            mids.append(swiglu_intermediate(xs[off:off + k], w1[e], w3[e], 10.0).bfloat16())
            off += k
        mid = torch.cat(mids)
        del mids
        sub_in = HessianSet(E, D, device=dev, experts=torch.tensor(ids))
        sub_mid = HessianSet(E, I, device=dev, experts=torch.tensor(ids))
        _, t = timed(lambda: (sub_in.add_segments(xs, n), sub_mid.add_segments(mid, n)))
        t_ours += t
        half_in = HessianSet(E, D, device=dev, experts=torch.tensor(ids), backend="cublas")
        half_mid = HessianSet(E, I, device=dev, experts=torch.tensor(ids), backend="cublas")
        _, t = timed(lambda: (half_in.add_segments(xs, n), half_mid.add_segments(mid, n)))
        t_halves += t

        def ref():
            out, off = [], 0
            for k in n.tolist():
                xf = xs[off:off + k].float()
                mf = mid[off:off + k].float()
                out.append((xf.T @ xf, mf.T @ mf))
                off += k
            return out
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        ref_h, t = timed(ref)
        torch.backends.cuda.matmul.allow_tf32 = prev
        t_ref += t
        if s == 0 and dev == "cuda" and a.syrk_configs:  # Triton SYRK configurations, same data
            from requant.quantizer.core.hessian_triton import grouped_syrk_
            x64 = xs[int(n[:int(torch.argmax(n))].sum()):][:int(n.max())].double()
            h64 = x64.T @ x64
            jmax = int(torch.argmax(n))
            for conf in a.syrk_configs.split(";"):
                kw = dict(kv.split("=") for kv in conf.split(","))
                kw = {k: (v == "1") if k == "flat" else int(v) for k, v in kw.items()}
                hh = torch.zeros(len(ids), D, D, device=dev)
                grouped_syrk_(hh, xs, n, **kw)  # compile
                hh.zero_()
                _, t = timed(lambda: grouped_syrk_(hh, xs, n, **kw))
                err = float((hh[jmax].double() - h64).norm() / h64.norm())
                hres_cfg.append({"config": conf, "seconds_chunk": t, "err_vs_fp64": err})
                print(f"[syrk {conf}] {t * 1e3:.1f} ms for chunk 0 ({int(n.sum()):,} tokens), err {err:.2e}", flush=True)
                del hh
            del x64, h64
        if s == 0:  # accuracy of both against float64 on the chunk's largest expert
            j = int(torch.argmax(n))
            off = int(n[:j].sum())
            x64 = xs[off:off + int(n[j])].double()
            h64 = x64.T @ x64
            acc = {"tokens": int(n[j]),
                   "ours_vs_fp64": float((sub_in.h[j].double() - h64).norm() / h64.norm()),
                   "fp32_recipe_vs_fp64": float((ref_h[j][0].double() - h64).norm() / h64.norm()),
                   "cublas_bf16_vs_fp64": float((half_in.h[j].double() - h64).norm() / h64.norm())}
            del x64, h64
        for j, (hi, hm) in enumerate(ref_h):
            max_rel = max(max_rel, float((sub_in.h[j] - hi).norm() / hi.norm()),
                          float((sub_mid.h[j] - hm).norm() / hm.norm()))
        h_in.h[ids] = sub_in.h
        h_mid.h[ids] = sub_mid.h
        h_in.count[ids] = n
        h_mid.count[ids] = n
        del xs, mid, ref_h, sub_in, sub_mid, half_in, half_mid
    return h_in, h_mid, {"syrk_configs": hres_cfg, "cublas_bf16_s": t_halves, "ours_s": t_ours, "fp32_recipe_s": t_ref, "max_rel_diff": max_rel, "vs_fp64": acc,
                         "routed_tokens": int(counts.sum()), "speedup": t_ref / t_ours}


def run_ours(w1, w2, w3, h_in, h_mid, cfg, batch, policy: LowTokenPolicy | None = None):
    """All 768 tensors: w1+w3 as one entry per expert (shared H, one factorisation), then w2.
    ``policy``: a low-token policy's damping / fitted Hessians (its RTN choice is not applied:
    this times GPTQ)."""
    E = w1.shape[0]
    out = {}
    for kind, hs in (("w13", h_in), ("w2", h_mid)):
        pooled = pooled_hessian(hs) if policy is not None and policy.kind == "shrink" else None
        for s in range(0, E, batch):
            sl = slice(s, min(s + batch, E))
            w = torch.cat([w1[sl], w3[sl]], 1) if kind == "w13" else w2[sl]
            h, damp = hs.mean(sl), None
            if policy is not None:
                counts = hs.count[sl]
                h, damp = policy.fit_hessian(h, counts, pooled), policy.damp(counts, h.shape[-1], cfg)
            r = gptq_batched(w, h, cfg, damp)
            out[(kind, s)] = (r.q, r.scale, r.path)
    return out


def errors_ours(res, w1, w2, w3, h_in, h_mid, batch, spec):
    E, I = w1.shape[0], w1.shape[1]
    errs, rtn_errs, fallbacks = [], [], 0
    for (kind, s), (q, scale, paths) in res.items():
        sl = slice(s, min(s + batch, E))
        hi, hm = (h_in.mean(sl), None) if kind == "w13" else (None, h_mid.mean(sl))
        wq = dequantize(q, scale, spec)
        fallbacks += sum(p != "gptq" for p in paths)
        if kind == "w13":
            for k, w in enumerate((w1[sl], w3[sl])):
                errs.append(exact_rel_err(w, wq[:, k * I:(k + 1) * I], hi))
                qr, sr = rtn(w.float(), spec)
                rtn_errs.append(exact_rel_err(w, dequantize(qr, sr, spec), hi))
        else:
            errs.append(exact_rel_err(w2[sl], wq, hm))
            qr, sr = rtn(w2[sl].float(), spec)
            rtn_errs.append(exact_rel_err(w2[sl], dequantize(qr, sr, spec), hm))
    return float(torch.cat(errs).mean()), float(torch.cat(rtn_errs).mean()), fallbacks


def load_llmcompressor():
    """Import llm-compressor's gptq_quantize without its heavy package __init__."""
    import importlib
    import importlib.util
    import types
    spec = importlib.util.find_spec("llmcompressor")
    if spec is None:
        return None
    root = Path(spec.submodule_search_locations[0])
    for name, sub in (("llmcompressor", ""), ("llmcompressor.modifiers", "modifiers"),
                      ("llmcompressor.modifiers.gptq", "modifiers/gptq")):
        m = types.ModuleType(name)
        m.__path__ = [str(root / sub)]
        sys.modules[name] = m
    return importlib.import_module("llmcompressor.modifiers.gptq.gptq_quantize")


def run_anchor(mod, w1, w2, w3, h_in, h_mid, spec, batch=32):
    from compressed_tensors.quantization import QuantizationArgs
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128)
    outs = []
    for w_all, hs in ((w1, h_in), (w3, h_in), (w2, h_mid)):
        E = w_all.shape[0]
        for s in range(0, E, batch):
            sl = slice(s, min(s + batch, E))
            w = w_all[sl]
            scale = group_scales(w, spec).to(w.dtype)
            zp = torch.zeros_like(scale, dtype=torch.int8)
            wq, _, fb = mod.quantize_weight(w.clone(), hs.mean(sl), scale, zp, None, args,
                                            blocksize=128, percdamp=0.01)
            outs.append((w_all, sl, hs, wq))
    return outs


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--inter", type=int, default=2048)
    p.add_argument("--mean-tokens", type=int, default=11094)
    p.add_argument("--min-tokens", type=int, default=430)
    p.add_argument("--max-tokens", type=int, default=175375)
    p.add_argument("--hessian-chunk", type=int, default=32)
    p.add_argument("--batch", type=int, default=0, help="experts per GPTQ batch (0: from free memory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small", action="store_true", help="tiny shapes, for a CPU smoke test")
    p.add_argument("--skip-anchor", action="store_true")
    p.add_argument("--variants", default="fp32update,dynamic,actorder,streams4,streams8,rows32s4", help="extra GPTQ variants to time")
    p.add_argument("--policies", default="token_damp,shrink", help="low-token policies to time (',' list; '' none)")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--syrk-configs", default="", help="';'-separated k=v,... Triton SYRK configs to time")
    p.add_argument("--profile", action="store_true", help="print a CUDA kernel profile of one w1/w3 batch")
    p.add_argument("--out", default="benchmarks/results/quantizer.json")
    a = p.parse_args()
    if a.small:
        a.experts, a.dim, a.inter, a.mean_tokens, a.min_tokens, a.max_tokens = 8, 256, 128, 600, 40, 4000
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    device_name = torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu"
    spec = QuantSpec()
    result = {"device": device_name, "torch": torch.__version__, "experts": a.experts,
              "shapes": {"w1": [a.inter, a.dim], "w3": [a.inter, a.dim], "w2": [a.dim, a.inter]}}

    counts, basis, outl, scale_in, w1, w2, w3, g = make_problem(a, dev)
    result["tokens_per_expert"] = {"min": int(counts.min()), "mean": float(counts.float().mean()),
                                   "max": int(counts.max())}
    h_in, h_mid, hres = bench_hessians(a, dev, counts, basis, outl, scale_in, w1, w3, g)
    result["hessians"] = hres
    print(f"[hessians] ours {hres['ours_s']:.3f}s (cuBLAS bf16 per expert {hres['cublas_bf16_s']:.3f}s)  fp32 recipe {hres['fp32_recipe_s']:.3f}s  "
          f"({hres['speedup']:.1f}x)  max rel diff {hres['max_rel_diff']:.2e}  "
          f"routed tokens {hres['routed_tokens']:,}  vs fp64: {hres['vs_fp64']}", flush=True)
    del basis

    if a.batch:
        batch = a.batch
    elif dev == "cuda":
        free, _ = torch.cuda.mem_get_info()
        per = 8 * 2 * a.inter * a.dim + 14 * a.dim * a.dim  # bytes per w1+w3 entry (gptq.py)
        batch = max(1, min(a.experts, int(0.6 * free // per)))
    else:
        batch = 4
    result["gptq_batch"] = batch
    cfg = GPTQConfig(spec=spec)
    run_ours(w1[:1], w2[:1], w3[:1], _sub(h_in, 1), _sub(h_mid, 1), cfg, 1)  # warm-up (Triton JIT)
    if a.profile and dev == "cuda":
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            _, t_prof = timed(lambda: run_ours(w1, w2, w3, h_in, h_mid, cfg, batch))
        ka = prof.key_averages()
        busy = sum(e.self_device_time_total for e in ka) / 1e6
        print(ka.table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=70))
        print(f"[profile] wall {t_prof:.3f}s, summed kernel time {busy:.3f}s")
    def median_run(c):
        run_ours(w1[:1], w2[:1], w3[:1], _sub(h_in, 1), _sub(h_mid, 1), c, 1)  # warm-up (Triton JIT)
        times = []
        for _ in range(a.repeat):
            res, t = timed(lambda: run_ours(w1, w2, w3, h_in, h_mid, c, batch))
            times.append(t)
        return res, sorted(times)[len(times) // 2], times

    res, t, times = median_run(cfg)
    err, err_rtn, fb = errors_ours(res, w1, w2, w3, h_in, h_mid, batch, spec)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None
    result["ours"] = {"seconds": t, "seconds_all": times, "mean_rel_err": err, "mean_rel_err_rtn": err_rtn,
                      "non_gptq_paths": fb, "peak_gpu_gib": peak}
    print(f"[gptq ours static] {t:.3f}s (median of {times}) for {3 * a.experts} tensors  err {err:.3e}  RTN {err_rtn:.3e}  "
          f"fallbacks {fb}  peak {peak} GiB", flush=True)
    del res

    # Factorisation share: our one Cholesky vs the reference's Cholesky + inverse + Cholesky.
    def our_factor():
        for s in range(0, a.experts, batch):
            _prepare(h_in.mean(slice(s, s + batch)), cfg)
    _, t_f = timed(our_factor)
    def ref_factor():
        for s in range(0, a.experts, batch):
            hh = h_in.mean(slice(s, s + batch))
            hh.diagonal(dim1=-2, dim2=-1).add_(0.01 * hh.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True))
            L = torch.linalg.cholesky(hh)
            torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    _, t_rf = timed(ref_factor)
    result["factorization"] = {"ours_s": t_f, "reference_path_s": t_rf}
    print(f"[factor w1/w3 H] ours {t_f:.3f}s  chol+cholesky_inverse+chol {t_rf:.3f}s", flush=True)

    torch.cuda.reset_peak_memory_stats() if dev == "cuda" else None
    for v in filter(None, a.variants.split(",")):
        variants = {"dynamic": dict(dynamic_groups=True), "actorder": dict(act_order=True),
                    "fp32update": dict(tf32_update=False), "rows32": dict(triton_rows=32),
                    "rows8": dict(triton_rows=8), "warps8": dict(triton_warps=8),
                    "rows32w8": dict(triton_rows=32, triton_warps=8),
                    "chol512": dict(cholesky_block=512),
                    "cusolver": dict(cholesky_block=0), "chol2048": dict(cholesky_block=2048),
                    "chol1024": dict(cholesky_block=1024),
                    "lazy128": dict(lazy_block=128), "lazy1024": dict(lazy_block=1024)}
        if v not in variants:
            continue
        res, t, times = median_run(GPTQConfig(spec=spec, **variants[v]))
        verr, _, vfb = errors_ours(res, w1, w2, w3, h_in, h_mid, batch, spec)
        result[f"ours_{v}"] = {"seconds": t, "seconds_all": times, "mean_rel_err": verr, "non_gptq_paths": vfb}
        print(f"[gptq ours {v}] {t:.3f}s  err {verr:.3e}", flush=True)
        del res

    # Low-token policies: their extra cost over the default (fixed damp) on the same tensors; the
    # error is in-sample (the Hessians GPTQ saw), so it says nothing about which policy is better.
    for kind in filter(None, a.policies.split(",")):
        pol = LowTokenPolicy(kind=kind)
        run_ours(w1[:1], w2[:1], w3[:1], _sub(h_in, 1), _sub(h_mid, 1), cfg, 1, pol)
        res, t = timed(lambda: run_ours(w1, w2, w3, h_in, h_mid, cfg, batch, pol))
        perr, _, _ = errors_ours(res, w1, w2, w3, h_in, h_mid, batch, spec)
        result[f"policy_{kind}"] = {"seconds": t, "over_default_s": t - result["ours"]["seconds"],
                                    "mean_rel_err_in_sample": perr}
        print(f"[gptq policy {kind}] {t:.3f}s ({t - result['ours']['seconds']:+.3f}s vs default)  "
              f"in-sample err {perr:.3e}", flush=True)
        del res

    mod = None if a.skip_anchor else load_llmcompressor()
    if mod is not None:
        run_anchor(mod, w1[:2], w2[:2], w3[:2], _sub(h_in, 2), _sub(h_mid, 2), spec, batch=2)  # warm-up
        outs, t = timed(lambda: run_anchor(mod, w1, w2, w3, h_in, h_mid, spec))
        errs = [exact_rel_err(w_all[sl], wq, hs.mean(sl)) for w_all, sl, hs, wq in outs]
        aerr = float(torch.cat(errs).mean())
        result["llmcompressor"] = {"seconds": t, "mean_rel_err": aerr, "batch": 32}
        result["speedup_vs_llmcompressor"] = t / result["ours"]["seconds"]
        result["err_ratio_vs_llmcompressor"] = result["ours"]["mean_rel_err"] / aerr
        print(f"[gptq llm-compressor 0.14] {t:.3f}s  err {aerr:.3e}   -> ours is "
              f"{result['speedup_vs_llmcompressor']:.1f}x faster, error ratio "
              f"{result['err_ratio_vs_llmcompressor']:.4f}", flush=True)
    else:
        print("[gptq llm-compressor] not importable: anchor skipped")

    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], Path(a.out).name).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def _sub(hs: HessianSet, n: int) -> HessianSet:
    s = HessianSet(hs.num_experts, hs.dim, device="meta", experts=hs.experts[:n])
    s.h, s.count = hs.h[:n], hs.count[:n]
    return s


if __name__ == "__main__":
    main()

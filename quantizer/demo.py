"""`requant quantize-demo`: Hessians → batched GPTQ → pack, on a small synthetic expert
set, printing the per-tensor table. Seconds on a laptop CPU."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from requant.quantizer.core.experts import ExpertQuantConfig, quantize_experts
from requant.quantizer.core.gptq import GPTQConfig
from requant.quantizer.core.hessian import HessianSet, swiglu_intermediate
from requant.testing.synthetic import correlated_activations, expert_weights, skewed_counts


def run_demo(experts: int = 8, dim: int = 512, inter: int = 256, mean_tokens: int = 600,
             swiglu_limit: float | None = 10.0, seed: int = 0,
             out: Path | None = None, device: str | None = None) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    w1 = expert_weights(experts, inter, dim, gen)
    w3 = expert_weights(experts, inter, dim, gen)
    w2 = expert_weights(experts, dim, inter, gen)
    counts = skewed_counts(experts, mean_tokens, gen)
    counts[-1] = 0  # show the zero-token policy
    h_in, h_mid = HessianSet(experts, dim), HessianSet(experts, inter)
    t0 = time.perf_counter()
    for e, n in enumerate(counts.tolist()):
        # Each expert's tokens arrive in two batches with their expert ids, as in replay.
        x = correlated_activations(n, dim, gen).to(torch.bfloat16)
        ids = torch.full((n,), e, dtype=torch.long)
        for part in (slice(0, n // 2), slice(n // 2, n)):
            xb = x[part]
            h_in.add(xb, ids[part])
            h_mid.add(swiglu_intermediate(xb.float(), w1[e].float(), w3[e].float(), swiglu_limit), ids[part])
    t_h = time.perf_counter() - t0
    cfg = ExpertQuantConfig(gptq=GPTQConfig(), device=device)
    t0 = time.perf_counter()
    tensors, records = quantize_experts(w1, w2, w3, h_in, h_mid, cfg)
    t_q = time.perf_counter() - t0
    rows = [r.as_dict() for r in records]
    print(f"{'tensor':32} {'shape':>11} {'tokens':>6} {'path':>15} {'damp':>6} {'err GPTQ':>9} {'err RTN':>9}")
    for r in rows:
        fmt = lambda v: f"{v:9.2e}" if v is not None else f"{'—':>9}"
        damp = f"{r['damp']:6.2f}" if r["damp"] is not None else f"{'—':>6}"
        print(f"{r['name']:32} {'x'.join(map(str, r['shape'])):>11} {r['tokens']:6d} {r['path']:>15} "
              f"{damp} {fmt(r['err_gptq'])} {fmt(r['err_rtn'])}")
    g = [r["err_gptq"] for r in rows if r["err_gptq"] is not None]
    rt = [r["err_rtn"] for r in rows if r["err_rtn"] is not None]
    print(f"\n{len(rows)} tensors; Hessians {t_h:.2f}s, GPTQ+pack {t_q:.2f}s on {cfg.device or 'auto'}; "
          f"mean rel. output error GPTQ {sum(g)/len(g):.2e} vs RTN {sum(rt)/len(rt):.2e}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / "experts-w4a16.safetensors"))
        (out / "records.json").write_text(json.dumps(rows, indent=1))
        print(f"wrote {out / 'experts-w4a16.safetensors'} and records.json")
    return rows

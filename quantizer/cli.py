"""CLI commands of the quantizer."""
from __future__ import annotations

import argparse
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(experts=args.experts, dim=args.dim, inter=args.inter, seed=args.seed,
             out=Path(args.out) if args.out else None, device=args.device)
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from requant.quantizer.stage.run import QuantizeJob, format_summary, run_quantize

    job = QuantizeJob(stores=args.store, master=args.master, base=args.base, out=args.out, replay=args.replay,
                      workers=args.gpus, use_ray=False if args.no_ray else None, processes=args.processes,
                      partitions=args.partitions, holdout=args.holdout,
                      holdout_seed=args.holdout_seed, act_order=args.act_order,
                      w2_weighting=args.w2_weighting, min_tokens=args.min_tokens, device=args.device,
                      damp=args.damp, low_tokens=args.low_tokens, low_tokens_alpha=args.low_tokens_alpha,
                      low_tokens_ratio=args.low_tokens_ratio, fp8_scale=args.fp8_scale,
                      max_bytes=int(args.max_memory_gib * (1 << 30)), max_rows=args.max_rows,
                      memory_limit=None if args.memory_limit_gib is None else int(args.memory_limit_gib * (1 << 30)))
    res = run_quantize(job, progress=not args.quiet)
    print(format_summary(res.summary))
    print(f"shard {res.shard}\nreport {res.report}\nmanifest {res.manifest}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from requant.quantizer.core.experts import POLICIES, LowTokenPolicy
    from requant.quantizer.core.limits import MAX_BYTES, MAX_ROWS

    q = sub.add_parser("quantize", help="replay capture stores through the MTP layer, GPTQ its routed experts, "
                                        "assemble a checkpoint (base + MTP W4A16 shard), manifest and report")
    q.add_argument("--store", action="append", required=True, help="capture store (repeat for several)")
    q.add_argument("--master", required=True, help="checkpoint holding the MTP layer's master weights")
    q.add_argument("--base", required=True, help="base checkpoint (sharded, with model.safetensors.index.json)")
    q.add_argument("--out", required=True, help="new output directory (must not exist)")
    q.add_argument("--replay", choices=["identity", "full", "both"], default="identity",
                   help="identity: attention sub-layer skipped (seed's approximation); full: the real MTP block over "
                        "whole sequences; both: quantise with full, report the Hessian distance")
    q.add_argument("--gpus", type=int, default=1, help="workers (one GPU each; >1 runs on Ray)")
    q.add_argument("--no-ray", action="store_true", help="no Ray: one worker in this process (or --processes)")
    q.add_argument("--processes", action="store_true",
                   help="with --no-ray: one spawned process per worker, worker g on GPU g")
    q.add_argument("--partitions", type=int, default=None,
                   help="calibration partitions of whole sequences (default: one per 65,536 rows, at most 64); "
                        "fixed per job, not per worker count: more workers than partitions leaves some idle")
    q.add_argument("--holdout", type=float, default=0.1,
                   help="fraction of prompts held out for the held-out error figures (0: none; default %(default)g)")
    q.add_argument("--holdout-seed", type=int, default=0, help="seed of the held-out prompt choice")
    q.add_argument("--act-order", action="store_true", help="GPTQ with act-order (lower error, static groups)")
    q.add_argument("--w2-weighting", choices=["none", "routing"], default="none")
    q.add_argument("--min-tokens", type=int, default=64, help="report flags experts with fewer routed tokens")
    q.add_argument("--damp", type=float, default=0.01)
    low = LowTokenPolicy()
    q.add_argument("--low-tokens", choices=POLICIES, default=low.kind,
                   help="GPTQ for experts with few calibration tokens T for an input D wide (default %(default)s): "
                        "damp: the fixed --damp; token_damp: damp + alpha·D/T; shrink: toward the pooled Hessian "
                        "of all experts, weight T/(T+D); rtn_below: RTN when T < ratio·D")
    q.add_argument("--low-tokens-alpha", type=float, default=low.alpha, help="token_damp's alpha (default %(default)g)")
    q.add_argument("--low-tokens-ratio", type=float, default=low.ratio, help="rtn_below's ratio (default %(default)g)")
    q.add_argument("--fp8-scale", default="auto", choices=["auto", "keep", ".scale", ".weight_scale_inv", ".weight_scale"],
                   help="scale naming of FP8 MTP tensors passed through (auto: the base's convention)")
    q.add_argument("--max-memory-gib", type=float, default=MAX_BYTES / (1 << 30),
                   help="host memory for the rows being replayed, per worker (default %(default)g)")
    q.add_argument("--max-rows", type=int, default=MAX_ROWS,
                   help="rows per MTP-block call: bounds the replay's device memory (default %(default)d)")
    q.add_argument("--memory-limit-gib", type=float, default=None,
                   help="per-worker memory the plan must fit, checked before any work (GPU memory on GPUs, host "
                        "memory on CPUs; default: the GPU's total memory, or this host's memory / workers)")
    q.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_quantize)

    p = sub.add_parser("quantize-demo", help="GPTQ a small synthetic expert set and print the per-tensor table")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--dim", type=int, default=512, help="expert input dim (multiple of 128)")
    p.add_argument("--inter", type=int, default=256, help="expert intermediate dim (multiple of 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--out", default=None, help="also write the packed safetensors + records.json here")
    p.set_defaults(func=_demo)

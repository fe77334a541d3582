"""CLI commands of the quantizer."""
from __future__ import annotations

import argparse
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(experts=args.experts, dim=args.dim, inter=args.inter, seed=args.seed,
             out=Path(args.out) if args.out else None, device=args.device)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize-demo", help="GPTQ a small synthetic expert set and print the per-tensor table")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--dim", type=int, default=512, help="expert input dim (multiple of 128)")
    p.add_argument("--inter", type=int, default=256, help="expert intermediate dim (multiple of 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--out", default=None, help="also write the packed safetensors + records.json here")
    p.set_defaults(func=_demo)

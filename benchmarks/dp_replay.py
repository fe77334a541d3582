"""Data-parallel vs replicated replay: store rows/s of the replay and store bytes read per
worker against the worker count, both modes in the same run (replicated — every worker
reads and replays every row for its own experts — is the anchor).

Problem: the reduced DeepSeek-V4 MTP shapes of ``quantize_stage.py --small`` (hidden 512,
hc_mult 4, 16 routed experts top-2, moe_inter 256) with a FAKE master and base (random
weights at those shapes), a synthetic store of ``--rows`` rows (4 KiB each) in ``--seqs``
sequences, ``--partitions`` calibration partitions, 10% of the prompts held out. For each
worker count and mode, one ``run_quantize`` with one spawned process per worker (``--ray``:
Ray actors on a local cluster), gloo for the reduction on CPUs. Reported per run, from the
stage's manifest: the driver's wall time of the replay passes, of the reductions and of
GPTQ, store rows per second of replay wall, store bytes read per worker, Hessian bytes
reduced; and whether every run wrote the same shard. On a GPU machine the same command
runs one worker per GPU with NCCL.

    python3 benchmarks/dp_replay.py --out benchmarks/results/dp_replay_cpu.json
    python3 benchmarks/dp_replay.py --rows 8192 --workers 1 2     # quick look
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize_stage import dsv4_config, fake_base, fake_master, synthetic_store, write_result  # noqa: E402

from requant.quantizer import QuantizeJob, run_quantize  # noqa: E402


def one(job: dict, out: Path) -> dict:
    t0 = time.perf_counter()
    res = run_quantize(QuantizeJob(out=str(out), **job), progress=False)
    wall = time.perf_counter() - t0
    m = json.loads(res.manifest.read_text())
    t, s = m["timings"], m["summary"]
    replay = sum(v for k, v in t.items() if k.startswith("replay "))
    reduce = sum(v for k, v in t.items() if k.startswith("reduce "))
    rows = s["rows_calibration"] + s["rows_heldout"]
    return {"wall_s": wall, "start_s": t["start"], "replay_s": replay, "reduce_s": reduce, "gptq_s": t["gptq"],
            "rows_per_s": rows / replay, "bytes_read_per_worker": s["bytes_read_per_worker"],
            "rows_per_worker": s["rows_per_worker"],
            "bytes_reduced_per_worker": [w["bytes_reduced"] for w in m["workers"]],
            "idle_replay_workers": s["idle_replay_workers"], "timings": t,
            "shard_sha256": hashlib.sha256(res.shard.read_bytes()).hexdigest()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--seqs", type=int, default=128)
    ap.add_argument("--partitions", type=int, default=16)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--replay", choices=["identity", "full"], default="identity")
    ap.add_argument("--ray", action="store_true", help="Ray actors (local cluster) instead of spawned processes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (the same in every run)")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir, removed after)")
    ap.add_argument("--out", default=None, help="JSON result path")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # workers take the driver's count: equal sums in every run
    dev = torch.device("cpu")
    c = dsv4_config(small=True)
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="requant-dp-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict] = {}
    try:
        master, base = fake_master(scratch / "master", c, dev, False), fake_base(scratch / "base", c, dev)
        n = synthetic_store(scratch / "store", c, args.rows, args.seqs, dev)
        store_bytes = sum(p.stat().st_size for p in (scratch / "store").rglob("*") if p.is_file())
        print(f"store: {n:,} rows, {store_bytes / 1e6:.1f} MB on disk; {args.partitions} partitions; "
              f"replay {args.replay}; {'Ray actors' if args.ray else 'spawned processes'}", flush=True)
        base_job = {"stores": [str(scratch / "store")], "master": str(master), "base": str(base),
                    "replay": args.replay, "partitions": args.partitions, "gptq_batch": 2, "durable": False}
        for w in args.workers:
            for mode in ("replicated", "data"):
                if w == 1 and mode == "replicated":
                    continue  # one worker: the two modes are the same run
                name = f"{mode}-{w}"
                kw = {"workers": w, "parallel": mode}
                kw |= {"use_ray": True} if args.ray and w > 1 else {"use_ray": False, "processes": w > 1}
                runs[name] = r = one(base_job | kw, scratch / f"out-{name}")
                shutil.rmtree(scratch / f"out-{name}")
                mb = ", ".join(f"{b / 1e6:.1f}" for b in r["bytes_read_per_worker"])
                print(f"{name:13s} replay {r['replay_s']:6.2f} s ({r['rows_per_s']:8,.0f} rows/s)  reduce "
                      f"{r['reduce_s']:5.2f} s  gptq {r['gptq_s']:5.2f} s  stage {r['wall_s']:6.2f} s  "
                      f"MB read per worker [{mb}]", flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print()
    print("| workers | mode | replay s | store rows/s | MB read per worker (max) | MB read, all workers | "
          "Hessian MB reduced per worker | stage s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        mode, w = name.rsplit("-", 1)
        print(f"| {w} | {mode} | {r['replay_s']:.2f} | {r['rows_per_s']:,.0f} | "
              f"{max(r['bytes_read_per_worker']) / 1e6:.1f} | {sum(r['bytes_read_per_worker']) / 1e6:.1f} | "
              f"{max(r['bytes_reduced_per_worker']) / 1e6:.1f} | {r['wall_s']:.2f} |")
    same = len({r["shard_sha256"] for r in runs.values()}) == 1
    print(f"\nshard bit-identical across all {len(runs)} runs: {same}")
    result = {"benchmark": "dp_replay", "rows": n, "seqs": args.seqs, "partitions": args.partitions,
              "replay": args.replay, "runner": "ray" if args.ray else "processes", "threads": args.threads,
              "store_bytes": store_bytes, "config": c, "device": platform.processor() or "cpu",
              "cores": os.cpu_count(), "torch": torch.__version__, "runs": runs,
              "shards_identical": same, "date": time.strftime("%Y-%m-%d", time.gmtime())}
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()

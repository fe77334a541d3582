"""Cost model of the data-parallel quantize stage at 1×, 10× and 100× the seed's calibration
rows on 1, 8 and 64 GPUs (DeepSeek-V4-Flash MTP shapes), from measured rates — a model on
paper, not a run: it prints the table in benchmarks/README.md.

Measured inputs (files under benchmarks/results/):
* one H200, whole stage at 473,000 rows (quantize_stage_h200.json, BF16 master, code before
  the data-parallel replay): replay identity 4.726 s, full 11.754 s (store read + block +
  Hessians), master load 2.27 s, GPTQ of 768 tensors 2.71 s, assemble + report 3.65 s, the
  cold run's extra first CUDA/Triton use 5.4 s;
* the store reader on the H100 host: 4.54 GB/s warm, 1.72 GB/s cold, one process
  (storage_h100host.json);
* read amplification of partitions (chunks read twice at partition and held-out edges), on a
  synthetic store of the seed's geometry (256 sequences of ~1.85k rows, 1,024-row chunks),
  this machine: +9% at 8 partitions, +18% at 64 (``python3 benchmarks/dp_cost_model.py --measure-reads``).

Assumed, NOT measured (the GPU run must replace them): NCCL reduce bandwidth per GPU 300 GB/s
inside an NVLink node, 40 GB/s between nodes (400 Gb/s NIC per GPU); folding a partition
into the int64 sums 0.05 s (~150 GB of HBM traffic); held-out errors 25% of GPTQ time (as
measured on CPU); GPTQ batches of 72 experts on an H200 (``gptq_batch_size``) → at most 4
expert owners.

    python3 benchmarks/dp_cost_model.py             # the table
    python3 benchmarks/dp_cost_model.py --measure-reads   # the read amplification (CPU, ~1 min)
"""
from __future__ import annotations

import argparse
import math

ROWS0, ROW_BYTES = 473_000, 4 * 4096 * 2 + 16            # seed rows; DSV4 row + token/position/seq
RATE = {"identity": ROWS0 / 4.726, "full": ROWS0 / 11.754}  # rows/s per H200, store read included
LOAD, GPTQ_ALL, ASSEMBLE, START = 2.27, 2.71, 3.65, 5.4
E, D, I, BATCH = 256, 4096, 2048, 72
SUMS = 8 * E * (D * D + I * I)                             # int64 sums of one pass: 43 GB
BW_NODE, BW_NET, GPUS_PER_NODE = 300e9, 40e9, 8            # assumed
FOLD, HELDOUT_FRACTION, HELDOUT_ERR = 0.05, 0.1, 0.25      # assumed / default / CPU ratio


def amplification(partitions: int) -> float:
    return 1.09 if partitions <= 8 else 1.18


def model(scale: int, gpus: int, mode: str) -> dict:
    rows = scale * ROWS0
    cal = rows * (1 - HELDOUT_FRACTION)
    parts = min(64, math.ceil(cal / 65536))
    parts_ho = max(1, round(parts * HELDOUT_FRACTION / (1 - HELDOUT_FRACTION)))
    busy = min(gpus, parts)
    read = rows * ROW_BYTES * amplification(parts)
    replay = rows / busy / RATE[mode]
    fold = (math.ceil(parts / busy) + math.ceil(parts_ho / min(gpus, parts_ho))) * FOLD
    reduced = 2 * SUMS if gpus > 1 else 0                  # held-out + calibration passes
    reduce = reduced / (BW_NODE if gpus <= GPUS_PER_NODE else BW_NET)
    owners = min(gpus, math.ceil(E / BATCH))
    gptq = GPTQ_ALL * min(E, math.ceil(math.ceil(E / BATCH) / owners) * BATCH) / E * (1 + HELDOUT_ERR)
    total = START + LOAD + replay + fold + reduce + gptq + ASSEMBLE
    need = RATE[mode] * ROW_BYTES * min(gpus, GPUS_PER_NODE) / 1e9  # GB/s per node to keep up
    return {"rows": rows, "partitions": parts, "busy": busy, "read_gb": read / 1e9, "read_per_gpu_gb": read / busy / 1e9,
            "reduced_gb": reduced / 1e9, "replay": replay, "fold": fold, "reduce": reduce, "gptq": gptq,
            "fixed": START + LOAD + ASSEMBLE, "total": total, "storage_gbps_per_node": need}


def table() -> None:
    print("| rows | GPUs | partitions (replaying GPUs) | store GB read: all / per GPU | Hessian GB reduced per GPU "
          "| replay identity / full s | fold s | reduce s | GPTQ + held-out s | fixed s | stage identity / full s "
          "| speed-up identity / full | storage GB/s per node, identity |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for scale in (1, 10, 100):
        one = {m: model(scale, 1, m)["total"] for m in RATE}
        for gpus in (1, 8, 64):
            a, b = model(scale, gpus, "identity"), model(scale, gpus, "full")
            print(f"| {a['rows'] / 1e6:.2f} M ({scale}×) | {gpus} | {a['partitions']} ({a['busy']}) | "
                  f"{a['read_gb']:,.0f} / {a['read_per_gpu_gb']:,.1f} | {a['reduced_gb']:.0f} | "
                  f"{a['replay']:.1f} / {b['replay']:.1f} | {a['fold']:.2f} | {a['reduce']:.2f} | {a['gptq']:.2f} | "
                  f"{a['fixed']:.1f} | {a['total']:.1f} / {b['total']:.1f} | "
                  f"{one['identity'] / a['total']:.1f}× / {one['full'] / b['total']:.1f}× | "
                  f"{a['storage_gbps_per_node']:.1f} |")


def measure_reads() -> None:
    """Store bytes all partitions read, over one plain pass, on the seed's geometry."""
    import tempfile
    from pathlib import Path

    import numpy as np

    from _path import ensure_requant

    ensure_requant()
    from requant.quantizer.stage.partition import plan_partitions
    from requant.storage import CaptureStore, Layout, StoreMeta, StoreReader

    d = Path(tempfile.mkdtemp(prefix="requant-reads-"))
    rng = np.random.default_rng(0)
    st = CaptureStore.create(str(d / "s"), StoreMeta(hidden_size=64, hc_mult=1), Layout(rows_per_chunk=1024))
    with st.writer("w") as w:
        for i in range(256):
            n = int(rng.integers(462, 3696))  # mean ~1.85k rows, as 473k rows in 256 sequences
            w.append_sequence(i, rng.integers(0, 1 << 15, (n, 64), dtype=np.uint16), np.zeros(n, dtype=np.int64),
                              np.arange(n), prompt_id=f"p{i}")
    with StoreReader([str(d / "s")]) as r:
        list(r.batches(max_rows=16384))
        whole = r.bytes_read
    for holdout in (0.0, 0.1):
        for p in (8, 64):
            plan = plan_partitions([str(d / "s")], partitions=p, holdout=holdout)
            got = {}
            for mode in ("identity", "full"):
                total = 0
                for part in plan.calibration + plan.heldout:
                    with StoreReader([str(d / "s")]) as r:
                        it = r.batches if mode == "identity" else r.sequences
                        list(it(max_rows=16384, runs=part.reader_runs()))
                        total += r.bytes_read
                got[mode] = total / whole
            print(f"held-out {holdout:.0%}, {p} partitions: identity {got['identity']:.3f}×, full {got['full']:.3f}× "
                  "the bytes of one plain pass")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--measure-reads", action="store_true")
    args = ap.parse_args()
    measure_reads() if args.measure_reads else table()

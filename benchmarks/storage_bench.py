"""Capture-store throughput and compression on activations that look like DSV4 MTP inputs.

Rows are hc_mult × hidden = 4 × 4096 bf16 (32 KiB), heavy-tailed (Student-t latents),
correlated across channels (low-rank mix), with per-channel scales and outlier channels —
not uniform noise. For each codec / chunk size: write GB/s through ``GroupWriter`` (durable
commits, the production path), read GB/s through ``StoreReader.batches``, and the
compression ratio. In the same run, the anchor: the seed's way — one loose ``.npy`` file
per forward call, written and read back. Raw bytes = bf16 rows + token/position/seq columns.

    python3 benchmarks/storage_bench.py --rows 8192 --out benchmarks/results/storage_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _path import ensure_requant  # noqa: E402

ensure_requant()
from requant.storage import CaptureStore, Layout, StoreMeta, StoreReader  # noqa: E402


def activations(rows: int, hidden: int, hc: int, seed: int = 0) -> np.ndarray:
    """uint16 bf16 bit patterns [rows, hc*hidden]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    width = hidden * hc
    latent = torch.distributions.StudentT(4.0).sample((rows, 64))
    mix = torch.randn(64, width, generator=g) / 8
    scale = torch.exp(torch.randn(width, generator=g) * 0.7)
    scale[torch.randperm(width, generator=g)[: width // 256]] *= 20  # outlier channels
    x = (latent @ mix + 0.3 * torch.randn(rows, width, generator=g)) * scale
    return x.bfloat16().view(torch.int16).numpy().view(np.uint16)


def bench_store(root: str, data: np.ndarray, seq_len: int, hidden: int, hc: int, layout: Layout,
                threads: int) -> dict:
    path = os.path.join(root, "store")
    shutil.rmtree(path, ignore_errors=True)
    rows = data.shape[0]
    raw = data.nbytes + rows * 16
    store = CaptureStore.create(path, StoreMeta(hidden_size=hidden, hc_mult=hc), layout)
    t = time.perf_counter()
    with store.writer("r0") as w:
        for s, r0 in enumerate(range(0, rows, seq_len)):
            r1 = min(r0 + seq_len, rows)
            w.append_sequence(s, data[r0:r1], np.arange(r1 - r0), np.arange(r1 - r0), prompt_id=str(s))
    t_write = time.perf_counter() - t
    stored = store.stored_bytes()
    reader = StoreReader(path, threads=threads)
    t = time.perf_counter()
    n = sum(len(b) for b in reader.batches(max_bytes=6 << 30))  # GiB batches, as the quantize stage reads
    t_read = time.perf_counter() - t
    assert n == rows
    reader.close()
    shutil.rmtree(path)
    return {"write_GBps": raw / t_write / 1e9, "read_GBps": raw / t_read / 1e9, "ratio": raw / stored,
            "write_s": t_write, "read_s": t_read}


def bench_loose_files(root: str, data: np.ndarray, seq_len: int) -> dict:
    """The seed's anchor: one .npy dump file per forward call (uncompressed)."""
    path = os.path.join(root, "dumps")
    os.makedirs(path, exist_ok=True)
    rows = data.shape[0]
    raw = data.nbytes + rows * 16
    t = time.perf_counter()
    for s, r0 in enumerate(range(0, rows, seq_len)):
        r1 = min(r0 + seq_len, rows)
        with open(os.path.join(path, f"{s:06d}.npy"), "wb") as f:
            np.save(f, data[r0:r1])
            np.save(f, np.arange(r1 - r0, dtype=np.int64))
            f.flush()
            os.fsync(f.fileno())
    t_write = time.perf_counter() - t
    t = time.perf_counter()
    n = 0
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            n += np.load(f).shape[0]
            np.load(f)
    t_read = time.perf_counter() - t
    assert n == rows
    shutil.rmtree(path)
    return {"write_GBps": raw / t_write / 1e9, "read_GBps": raw / t_read / 1e9, "ratio": 1.0}


def _proc_write(path: str, idx: int, rows: int, seq_len: int, hidden: int, hc: int, barrier, out) -> None:
    data = activations(rows, hidden, hc, seed=100 + idx)
    store = CaptureStore.open(path, mode="r+")
    barrier.wait()
    t0 = time.perf_counter()
    with store.writer(f"replica{idx}") as w:
        for s, r0 in enumerate(range(0, rows, seq_len)):
            r1 = min(r0 + seq_len, rows)
            w.append_sequence(s, data[r0:r1], np.arange(r1 - r0), np.arange(r1 - r0))
    out.put((t0, time.perf_counter(), data.nbytes + rows * 16))


def bench_parallel_writers(root: str, procs: int, rows: int, seq_len: int, hidden: int, hc: int) -> dict:
    """Aggregate write throughput of `procs` writer processes, one group each (one per
    replica/rank, as in production), into one store."""
    import multiprocessing as mp

    path = os.path.join(root, "par")
    shutil.rmtree(path, ignore_errors=True)
    CaptureStore.create(path, StoreMeta(hidden_size=hidden, hc_mult=hc), Layout())
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    ps = [ctx.Process(target=_proc_write, args=(path, i, rows // procs, seq_len, hidden, hc, barrier, out))
          for i in range(procs)]
    for p in ps:
        p.start()
    res = [out.get() for _ in ps]
    for p in ps:
        p.join()
    t = max(r[1] for r in res) - min(r[0] for r in res)
    raw = sum(r[2] for r in res)
    store = CaptureStore.open(path)
    assert store.verify() == [] and len(store.writer_names()) == procs
    ratio = raw / store.stored_bytes()
    shutil.rmtree(path)
    return {"procs": procs, "write_GBps": raw / t / 1e9, "ratio": ratio}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--hc", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256, help="rows per appended sequence")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="reader threads")
    p.add_argument("--procs", default="", help="comma-separated writer-process counts to measure in aggregate")
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    p.add_argument("--out", default="benchmarks/results/storage.json")
    a = p.parse_args()
    root = tempfile.mkdtemp(prefix="requant-storage-bench-", dir=a.dir)
    data = activations(a.rows, a.hidden, a.hc)
    res = {"machine": f"{platform.node()} {os.cpu_count()} cores", "rows": a.rows,
           "row_bytes": data.shape[1] * 2, "raw_GB": (data.nbytes + a.rows * 16) / 1e9, "configs": {}}
    print(f"{a.rows} rows × {data.shape[1]} bf16 ({res['raw_GB']:.2f} GB raw) on {res['machine']}")
    res["anchor_loose_npy"] = bench_loose_files(root, data, a.seq_len)
    r = res["anchor_loose_npy"]
    print(f"{'anchor: loose .npy per call':34s} write {r['write_GBps']:6.2f} GB/s  read {r['read_GBps']:6.2f} GB/s  ratio 1.00")
    codecs = [("none", 0, "noshuffle"), ("zstd", 1, "noshuffle"), ("zstd", 3, "noshuffle"), ("zstd", 5, "noshuffle"),
              ("blosc-lz4", 5, "shuffle"), ("blosc-lz4", 5, "bitshuffle"),
              ("blosc-zstd", 1, "shuffle"), ("blosc-zstd", 1, "bitshuffle"), ("blosc-zstd", 3, "bitshuffle")]
    for comp, level, shuffle in codecs:
        lay = Layout(compressor=comp, level=level, shuffle=shuffle)
        key = f"{comp}:{level}:{shuffle}:{lay.rows_per_chunk}"
        r = res["configs"][key] = bench_store(root, data, a.seq_len, a.hidden, a.hc, lay, a.threads)
        print(f"{key:34s} write {r['write_GBps']:6.2f} GB/s  read {r['read_GBps']:6.2f} GB/s  ratio {r['ratio']:.3f}",
              flush=True)
    default = Layout()
    for rpc, per_shard in ((256, 4), (512, 2), (2048, 1)):
        if rpc * 2 > a.rows:
            continue
        lay = Layout(rows_per_chunk=rpc, chunks_per_shard=per_shard, compressor=default.compressor,
                     level=default.level, shuffle=default.shuffle)
        key = f"{default.compressor}:{default.level}:{default.shuffle}:{rpc}x{lay.chunks_per_shard}"
        r = res["configs"][key] = bench_store(root, data, a.seq_len, a.hidden, a.hc, lay, a.threads)
        print(f"{key:34s} write {r['write_GBps']:6.2f} GB/s  read {r['read_GBps']:6.2f} GB/s  ratio {r['ratio']:.3f}",
              flush=True)
    for n in [int(x) for x in a.procs.split(",") if x]:
        r = res["configs"][f"parallel:{n}"] = bench_parallel_writers(root, n, a.rows, a.seq_len, a.hidden, a.hc)
        print(f"{'default, ' + str(n) + ' writer processes':34s} write {r['write_GBps']:6.2f} GB/s aggregate"
              f"  ratio {r['ratio']:.3f}", flush=True)
    shutil.rmtree(root, ignore_errors=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], Path(a.out).name).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

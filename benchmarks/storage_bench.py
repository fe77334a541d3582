"""Capture-store throughput and compression on activations that look like DSV4 MTP inputs.

Rows are hc_mult × hidden = 4 × 4096 bf16 (32 KiB), heavy-tailed (Student-t latents),
correlated across channels (low-rank mix), with per-channel scales and outlier channels —
not uniform noise. Measured in one run:
- each codec alone on one core (ratio, encode/decode GB/s): zstd levels, blosc lz4/zstd
  with byte or bit shuffle;
- stores: write GB/s through ``GroupWriter`` (durable commits, the production path), read
  GB/s through ``StoreReader.batches`` (page cache, and cold after evicting the files),
  compression ratio — for the default layout, the same through zarr-python alone, other
  chunk sizes and codecs;
- the anchor: the seed's way, one loose ``.npy`` file per forward call;
- reading while a consumer works on each batch, with and without prefetch;
- with ``--procs``, the aggregate write of several writer processes (one group each);
- what the readers' per-sequence checksums cost a read (``--checksums-only``: just that).
Raw bytes = bf16 rows + token/position/seq columns.

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


CODECS = [("zstd", 1, "noshuffle"), ("zstd", 3, "noshuffle"), ("zstd", 5, "noshuffle"), ("zstd", 9, "noshuffle"),
          ("blosc-lz4", 5, "shuffle"), ("blosc-lz4", 5, "bitshuffle"), ("blosc-zstd", 1, "shuffle"),
          ("blosc-zstd", 1, "bitshuffle"), ("blosc-zstd", 3, "shuffle")]


def bench_codecs(data: np.ndarray, rows_per_chunk: int) -> dict:
    """Each codec alone on one core (no I/O): ratio, encode and decode GB/s of raw bf16."""
    from numcodecs import Blosc, Zstd

    chunks = [np.ascontiguousarray(data[r:r + rows_per_chunk])
              for r in range(0, min(len(data), 4 * rows_per_chunk), rows_per_chunk)]
    raw = sum(c.nbytes for c in chunks)
    out = {}
    for comp, level, shuffle in CODECS:
        if comp == "zstd":
            codec = Zstd(level=level)
        else:
            codec = Blosc(cname=comp.split("-")[1], clevel=level, typesize=2, blocksize=0,
                          shuffle={"shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}[shuffle])
        t = time.perf_counter()
        enc = [codec.encode(c) for c in chunks]
        t_enc = time.perf_counter() - t
        t = time.perf_counter()
        for e, c in zip(enc, chunks):
            codec.decode(e, out=np.empty_like(c))
        t_dec = time.perf_counter() - t
        out[f"{comp}:{level}:{shuffle}"] = {"ratio": raw / sum(len(e) for e in enc),
                                            "encode_GBps_1core": raw / t_enc / 1e9,
                                            "decode_GBps_1core": raw / t_dec / 1e9}
    return out


def _drop_cache(path: str) -> None:
    """Evict a written (fsynced, so clean) tree from the page cache: the next read is a disk read."""
    for p in Path(path).rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _write(path: str, data: np.ndarray, seq_len: int, hidden: int, hc: int, layout: Layout,
           direct: bool | None, writer: str = "r0") -> float:
    store = CaptureStore.create(path, StoreMeta(hidden_size=hidden, hc_mult=hc), layout, exist_ok=True)
    rows = data.shape[0]
    t = time.perf_counter()
    with store.writer(writer, direct=direct) as w:
        for s, r0 in enumerate(range(0, rows, seq_len)):
            r1 = min(r0 + seq_len, rows)
            w.append_sequence(s, data[r0:r1], np.arange(r1 - r0), np.arange(r1 - r0), prompt_id=str(s))
    return time.perf_counter() - t


def _read(path: str, threads: int, direct: bool | None, max_bytes: int, consumer_GBps: float = 0,
          check: bool = True) -> float:
    t = time.perf_counter()
    with StoreReader(path, threads=threads, direct=direct, check=check) as reader:
        n = 0
        for b in reader.batches(max_bytes=max_bytes):
            n += len(b)
            if consumer_GBps:  # a consumer (replay on the GPU) busy with this batch meanwhile
                time.sleep(b.nbytes / consumer_GBps / 1e9)
    assert n == reader.rows
    return time.perf_counter() - t


def bench_store(root: str, data: np.ndarray, seq_len: int, hidden: int, hc: int, layout: Layout,
                threads: int, direct: bool | None = None, cold: bool = False, repeat: int = 1) -> dict:
    """Write through GroupWriter (durable commits), read through StoreReader.batches in
    1 GiB batches (as the quantize stage reads), warm (page cache) and optionally cold.
    Best of ``repeat`` runs (machines shared with other work)."""
    path = os.path.join(root, "store")
    raw = data.nbytes + data.shape[0] * 16
    budget = (2 + 1) << 30  # three 1 GiB batches (prefetch) + decode room
    budget += int(threads * 2.2 * layout.rows_per_chunk * (data.shape[1] * 2 + 16)) + (64 << 20)
    t_write = t_read = t_cold = float("inf")
    for _ in range(repeat):
        shutil.rmtree(path, ignore_errors=True)
        t_write = min(t_write, _write(path, data, seq_len, hidden, hc, layout, direct))
        stored = CaptureStore.open(path).stored_bytes()
        t_read = min(t_read, _read(path, threads, direct, budget))
        if cold:
            _drop_cache(path)
            t_cold = min(t_cold, _read(path, threads, direct, budget))
    res = {"write_GBps": raw / t_write / 1e9, "read_GBps": raw / t_read / 1e9, "ratio": raw / stored,
           "write_s": t_write, "read_s": t_read, "repeat": repeat}
    if cold:
        res.update(read_cold_GBps=raw / t_cold / 1e9, read_cold_s=t_cold)
    shutil.rmtree(path)
    return res


def bench_checksums(root: str, data: np.ndarray, seq_len: int, hidden: int, hc: int, threads: int,
                    repeat: int) -> dict:
    """What checking every sequence's rows against its checksum costs a read (warm, 1 GiB
    batches, default layout): the same store read with and without the check, interleaved,
    best of ``repeat``. The anchor is the unchecked read."""
    path = os.path.join(root, "ck")
    shutil.rmtree(path, ignore_errors=True)
    _write(path, data, seq_len, hidden, hc, Layout(), None)
    raw = data.nbytes + data.shape[0] * 16
    budget = (3 << 30) + int(threads * 2.2 * Layout().rows_per_chunk * (data.shape[1] * 2 + 16)) + (64 << 20)
    t = {True: float("inf"), False: float("inf")}
    for _ in range(repeat):
        for check in (False, True):
            t[check] = min(t[check], _read(path, threads, None, budget, check=check))
    shutil.rmtree(path)
    return {"read_checked_GBps": raw / t[True] / 1e9, "read_unchecked_GBps": raw / t[False] / 1e9,
            "read_checked_s": t[True], "read_unchecked_s": t[False], "overhead": t[True] / t[False] - 1,
            "repeat": repeat}


def bench_prefetch(root: str, data: np.ndarray, seq_len: int, hidden: int, hc: int, threads: int,
                   consumer_GBps: float) -> dict:
    """Reading while a consumer works on each batch: with prefetch the next batches are read
    meanwhile. Batches of 2048 rows (64 MiB of DSV4 rows): two chunks each, so one batch
    ahead keeps only two decode threads busy."""
    path = os.path.join(root, "pf")
    shutil.rmtree(path, ignore_errors=True)
    _write(path, data, seq_len, hidden, hc, Layout(), None)
    raw = data.nbytes + data.shape[0] * 16
    out = {"consumer_GBps": consumer_GBps, "consumer_alone_s": raw / consumer_GBps / 1e9}
    for prefetch in (0, 1, 4):
        t = time.perf_counter()
        with StoreReader(path, threads=threads) as reader:
            for b in reader.batches(max_rows=2048, prefetch=prefetch):
                time.sleep(b.nbytes / consumer_GBps / 1e9)
        out[f"prefetch_{prefetch}_s"] = time.perf_counter() - t
    shutil.rmtree(path)
    return out


def bench_loose_files(root: str, data: np.ndarray, seq_len: int) -> dict:
    """The seed's anchor: one .npy dump file per forward call (uncompressed, fsynced)."""
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

    def read() -> float:
        t = time.perf_counter()
        n = 0
        for name in sorted(os.listdir(path)):
            with open(os.path.join(path, name), "rb") as f:
                n += np.load(f).shape[0]
                np.load(f)
        assert n == rows
        return time.perf_counter() - t

    t_read = read()
    _drop_cache(path)
    t_cold = read()
    shutil.rmtree(path)
    return {"write_GBps": raw / t_write / 1e9, "read_GBps": raw / t_read / 1e9,
            "read_cold_GBps": raw / t_cold / 1e9, "ratio": 1.0}


def _proc_write(path: str, idx: int, rows: int, seq_len: int, hidden: int, hc: int, barrier, out) -> None:
    data = activations(rows, hidden, hc, seed=100 + idx)
    barrier.wait()
    t0 = time.perf_counter()
    _write(path, data, seq_len, hidden, hc, Layout(), None, writer=f"replica{idx}")
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


def probe_zarr_bf16() -> str:
    """Can the installed zarr-python store bfloat16 as a data type of its own?"""
    import zarr

    try:
        import ml_dtypes
        dtypes = [("ml_dtypes.bfloat16", ml_dtypes.bfloat16), ("'bfloat16'", "bfloat16")]
    except ImportError:
        dtypes = [("'bfloat16'", "bfloat16")]
    lines = []
    for label, dt in dtypes:
        try:
            a = zarr.create_array(store={}, shape=(4,), dtype=dt, zarr_format=3)
            a[:] = np.arange(4).astype(dt)
            lines.append(f"zarr {zarr.__version__}: dtype {label} works ({a.metadata.data_type})")
        except Exception as e:  # noqa: BLE001 — any failure is the answer
            lines.append(f"zarr {zarr.__version__}: dtype {label} fails: {type(e).__name__}: {e}")
    return "; ".join(lines)


def _line(key: str, r: dict) -> str:
    s = f"{key:38s} write {r['write_GBps']:6.2f} GB/s  read {r['read_GBps']:6.2f} GB/s"
    if "read_cold_GBps" in r:
        s += f" (cold {r['read_cold_GBps']:5.2f})"
    return s + f"  ratio {r['ratio']:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--hc", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256, help="rows per appended sequence")
    p.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 2), help="reader threads")
    p.add_argument("--repeat", type=int, default=1, help="best of N for each store configuration")
    p.add_argument("--procs", default="", help="comma-separated writer-process counts to measure in aggregate")
    p.add_argument("--probe-bf16", action="store_true", help="only report whether zarr stores bfloat16 natively")
    p.add_argument("--checksums-only", action="store_true",
                   help="only the cost of the readers' sequence checksums (checked vs unchecked reads)")
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    p.add_argument("--out", default="benchmarks/results/storage.json")
    a = p.parse_args()
    if a.probe_bf16:
        print(probe_zarr_bf16())
        return
    root = tempfile.mkdtemp(prefix="requant-storage-bench-", dir=a.dir)
    data = activations(a.rows, a.hidden, a.hc)
    import zarr
    res = {"machine": f"{platform.node()} {os.cpu_count()} cores", "rows": a.rows, "row_bytes": data.shape[1] * 2,
           "raw_GB": (data.nbytes + a.rows * 16) / 1e9, "zarr": zarr.__version__, "threads": a.threads, "repeat": a.repeat,
           "zarr_bf16": probe_zarr_bf16(), "configs": {}}
    print(f"{a.rows} rows × {data.shape[1]} bf16 ({res['raw_GB']:.2f} GB raw) on {res['machine']}; {res['zarr_bf16']}")
    r = res["checksums"] = bench_checksums(root, data, a.seq_len, a.hidden, a.hc, a.threads, max(a.repeat, 3))
    print(f"{'read, sequence checksums checked':38s} {r['read_checked_GBps']:6.2f} GB/s  anchor unchecked "
          f"{r['read_unchecked_GBps']:6.2f} GB/s  (+{100 * r['overhead']:.0f}% time)", flush=True)
    if a.checksums_only:
        shutil.rmtree(root, ignore_errors=True)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
        return

    res["codecs"] = bench_codecs(data, Layout().rows_per_chunk)
    for k, r in res["codecs"].items():
        print(f"codec {k:32s} ratio {r['ratio']:.3f}  encode {r['encode_GBps_1core']:5.2f} GB/s/core"
              f"  decode {r['decode_GBps_1core']:5.2f} GB/s/core", flush=True)

    r = res["anchor_loose_npy"] = bench_loose_files(root, data, a.seq_len)
    print(_line("anchor: loose .npy per call", r), flush=True)
    default = Layout()
    runs = [("default (direct shard I/O)", default, None, True),
            ("default through zarr-python only", default, False, True)]
    for rpc, per_shard in ((256, 4), (512, 2), (2048, 1)):
        if rpc * 2 <= a.rows:
            runs.append((f"zstd 1, {rpc} rows x {per_shard} per shard",
                         Layout(rows_per_chunk=rpc, chunks_per_shard=per_shard), None, False))
    for level in (3, 5):
        runs.append((f"zstd {level}", Layout(level=level), None, False))
    runs.append(("blosc-lz4 5 bitshuffle (zarr path)", Layout(compressor="blosc-lz4", level=5, shuffle="bitshuffle"),
                 None, False))
    runs.append(("no compression", Layout(compressor="none"), None, False))
    for key, lay, direct, cold in runs:
        r = res["configs"][key] = bench_store(root, data, a.seq_len, a.hidden, a.hc, lay, a.threads, direct, cold,
                                                  a.repeat)
        r["layout"] = lay.__dict__
        print(_line(key, r), flush=True)
    consumer = res["configs"]["default (direct shard I/O)"]["read_GBps"]
    r = res["prefetch"] = bench_prefetch(root, data, a.seq_len, a.hidden, a.hc, a.threads, consumer)
    print(f"read + consumer at {consumer:.2f} GB/s (64 MiB batches): consumer alone {r['consumer_alone_s']:.2f} s, "
          f"prefetch 0 / 1 / 4 batches: {r['prefetch_0_s']:.2f} / {r['prefetch_1_s']:.2f} / {r['prefetch_4_s']:.2f} s",
          flush=True)
    for n in [int(x) for x in a.procs.split(",") if x]:
        r = res["configs"][f"parallel:{n}"] = bench_parallel_writers(root, n, a.rows, a.seq_len, a.hidden, a.hc)
        print(f"{'default, ' + str(n) + ' writer processes':38s} write {r['write_GBps']:6.2f} GB/s aggregate"
              f"  ratio {r['ratio']:.3f}", flush=True)
    shutil.rmtree(root, ignore_errors=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], Path(a.out).name).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

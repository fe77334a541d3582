"""Streaming reads over one or many stores/writer groups with bounded memory.

Batches are whole chunks (rows_per_chunk rows) of one writer group. Each chunk is read and
decoded on its own (a thread pool runs ``threads`` of them at once) straight into the
batch's preallocated arrays, so reader memory is bounded by two batches (the one the
caller holds and the next) plus ``threads`` chunks' decode buffers — ``max_bytes`` bounds
that total (tests/storage measure it with tracemalloc). ``sequences()`` yields whole sequences in order
(attention-included replay needs them), carrying at most one partial sequence between
batches.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import google_crc32c
import numpy as np
import zstandard

from .schema import ROW_ARRAYS, StoreError

DECODE_FACTOR = 4.5
_ZSTD = threading.local()  # zstandard releases the GIL while decoding (numcodecs' decode
                            # scales worse across threads: measured in benchmarks/README.md)
from .store import CaptureStore


@dataclass
class Batch:
    hidden: np.ndarray        # uint16 [n, width]: bf16 bit patterns
    next_token: np.ndarray    # int32 [n]
    position: np.ndarray      # int32 [n]
    seq: np.ndarray           # int64 [n]
    store: str
    writer: str
    first_row: int            # row of hidden[0] in its group (before any shuffle)

    def __len__(self) -> int:
        return self.seq.shape[0]

    def hidden_torch(self):
        """The rows as a torch.bfloat16 tensor [n, width] (no copy)."""
        import torch

        return torch.from_numpy(np.ascontiguousarray(self.hidden).view(np.int16)).view(torch.bfloat16)


@dataclass
class SequenceRows:
    seq: int
    prompt_id: str
    replica: int
    writer: str
    hidden: np.ndarray
    next_token: np.ndarray
    position: np.ndarray


class StoreReader:
    """Reads committed rows of ``stores`` (paths or open stores), optionally some writers."""

    def __init__(self, stores: str | CaptureStore | Sequence[str | CaptureStore],
                 writers: Sequence[str] | None = None, threads: int = 4):
        if isinstance(stores, (str, CaptureStore)) or hasattr(stores, "__fspath__"):
            stores = [stores]
        self.stores = [s if isinstance(s, CaptureStore) else CaptureStore.open(str(s)) for s in stores]
        if not self.stores:
            raise ValueError("no stores to read")
        widths = {s.meta.row_width for s in self.stores}
        if len(widths) > 1:
            raise StoreError(f"stores disagree on row width: {sorted(widths)}")
        self.width = widths.pop()
        self.groups: list[tuple[CaptureStore, str, int]] = []
        for s in self.stores:
            for w in s.writer_names():
                if writers is None or w in writers:
                    self.groups.append((s, w, s.committed(w)[0]))
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads)

    @property
    def rows(self) -> int:
        return sum(n for _, _, n in self.groups)

    @property
    def row_bytes(self) -> int:
        return self.width * 2 + 4 + 4 + 8

    def _plan(self, max_rows: int | None, max_bytes: int | None) -> list[tuple[CaptureStore, str, int, int]]:
        plan = []
        for s, w, n in self.groups:
            chunk = s.layout.rows_per_chunk
            cap = n or 1
            if max_rows is not None:
                cap = min(cap, max_rows)
            if max_bytes is not None:
                # In flight: `threads` chunks; one chunk's read peaks at ~4× its raw size
                # (compressed bytes, checksum-stripped copy, decoded array, the slice) —
                # measured with tracemalloc on incompressible rows (tests/storage).
                decode = self.threads * DECODE_FACTOR * chunk * self.row_bytes
                if max_bytes < decode + 2 * chunk * self.row_bytes:
                    raise ValueError(f"max_bytes {max_bytes} is below one chunk of {s.path} plus decode "
                                     f"buffers ({(decode + 2 * chunk * self.row_bytes)} B for {chunk}-row chunks "
                                     f"of {self.row_bytes} B and {self.threads} threads)")
                # ×2: the batch the caller still holds while the next one is read
                cap = min(cap, int(max_bytes - decode) // (2 * self.row_bytes))
            if cap >= chunk:
                cap -= cap % chunk  # whole chunks: no chunk decoded twice
            for r0 in range(0, n, cap):
                plan.append((s, w, r0, min(r0 + cap, n)))
        return plan

    def _read(self, s: CaptureStore, w: str, r0: int, r1: int) -> Batch:
        g = s.group(w)
        arrays = {a: g[a] for a in ROW_ARRAYS}
        cols = {a: np.empty((r1 - r0,) + arr.shape[1:], dtype=arr.dtype) for a, arr in arrays.items()}
        chunk = s.layout.rows_per_chunk
        fast = _ShardFile.usable(s)
        shards: dict[int, _ShardFile] = {}

        def fill(a: str, c0: int) -> None:
            c1 = min(c0 - c0 % chunk + chunk, r1)
            if fast and a == "hidden":
                k = c0 // s.layout.rows_per_shard
                shards[k].read_rows(c0, c1, cols[a][c0 - r0:c1 - r0])
            else:
                cols[a][c0 - r0:c1 - r0] = arrays[a][c0:c1]

        starts = [r0] + list(range(r0 - r0 % chunk + chunk, r1, chunk))
        if fast:
            for k in {c0 // s.layout.rows_per_shard for c0 in starts}:
                shards[k] = _ShardFile(s, w, k)
        futs = [self._pool.submit(fill, a, c0) for a in ROW_ARRAYS for c0 in starts]
        try:
            for f in futs:
                f.result()
        except Exception as e:  # noqa: BLE001 — decode/checksum errors vary by codec
            raise StoreError(f"{s.group_path(w)}: rows {r0}–{r1} unreadable: {type(e).__name__}: {e}") from e
        return Batch(store=s.path, writer=w, first_row=r0, **cols)

    def batches(self, max_rows: int | None = None, max_bytes: int | None = None,
                shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
        """All committed rows in batches; with ``shuffle`` the batch order and the rows
        within each batch are permuted (seeded, reproducible)."""
        plan = self._plan(max_rows, max_bytes)
        rng = np.random.default_rng(seed)
        if shuffle:
            plan = [plan[i] for i in rng.permutation(len(plan))]
        for s, w, r0, r1 in plan:
            b = self._read(s, w, r0, r1)
            if shuffle:
                p = rng.permutation(len(b))
                b = Batch(b.hidden[p], b.next_token[p], b.position[p], b.seq[p], b.store, b.writer, b.first_row)
            yield b

    def sequences(self, max_bytes: int | None = None) -> Iterator[SequenceRows]:
        """Whole sequences in writer and index order."""
        for s, w, n in self.groups:
            idx = s.index(w)
            k = 0  # next sequence to emit
            carry: Batch | None = None
            for _, _, r0, r1 in [p for p in self._plan(None, max_bytes) if p[0] is s and p[1] == w]:
                b = self._read(s, w, r0, r1)
                if carry is not None:
                    b = Batch(*(np.concatenate([getattr(carry, a), getattr(b, a)]) for a in
                                ("hidden", "next_token", "position", "seq")), s.path, w, carry.first_row)
                while k < len(idx["seq"]):
                    f, ln = int(idx["first_row"][k]), int(idx["length"][k])
                    if f + ln > b.first_row + len(b):
                        break
                    o = f - b.first_row
                    yield SequenceRows(int(idx["seq"][k]), str(idx["prompt_id"][k]), int(idx["replica"][k]), w,
                                       b.hidden[o:o + ln], b.next_token[o:o + ln], b.position[o:o + ln])
                    k += 1
                if k < len(idx["seq"]):
                    o = int(idx["first_row"][k]) - b.first_row
                    carry = Batch(b.hidden[o:], b.next_token[o:], b.position[o:], b.seq[o:], s.path, w,
                                  b.first_row + o)
                else:
                    carry = None

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class _ShardFile:
    """Direct reads of one local ``hidden`` shard, bypassing zarr-python's single event-loop
    thread (which caps a process at ~0.7 GB/s): each chunk is pread, crc32c-checked and
    zstd-decoded straight into the batch on a pool thread (both release the GIL). The bytes
    are the Zarr v3 sharding layout zarr itself wrote — chunks, then an index of
    (offset, nbytes) uint64 pairs + crc32c — and tests read every store both ways."""

    def __init__(self, s: CaptureStore, w: str, k: int):
        lay = s.layout
        self.rows_per_chunk, self.first_row = lay.rows_per_chunk, k * lay.rows_per_shard
        self.width = s.meta.row_width
        self.path = f"{s.group_path(w).removeprefix('file://')}/hidden/c/{k}/0"
        self.compressed = lay.compressor == "zstd"
        n = lay.chunks_per_shard
        with open(self.path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(size - (16 * n + 4))
            tail = f.read()
        if len(tail) != 16 * n + 4 or not _crc_ok(tail[:-4], tail[-4:]):
            raise StoreError(f"{self.path}: shard index damaged (truncated file or checksum mismatch)")
        self.index = np.frombuffer(tail[:-4], dtype="<u8").reshape(n, 2)

    @staticmethod
    def usable(s: CaptureStore) -> bool:
        return s.is_local and s.layout.compressor in ("zstd", "none")

    def read_rows(self, r0: int, r1: int, out: np.ndarray) -> None:
        j = (r0 - self.first_row) // self.rows_per_chunk
        off, nbytes = (int(v) for v in self.index[j])
        if off == 2**64 - 1:
            raise StoreError(f"{self.path}: chunk {j} missing")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            blob = os.pread(fd, nbytes, off)
        finally:
            os.close(fd)
        if len(blob) != nbytes or not _crc_ok(memoryview(blob)[:-4], blob[-4:]):
            raise StoreError(f"{self.path}: chunk {j} checksum mismatch (corrupted or truncated)")
        body = memoryview(blob)[:-4]
        if self.compressed:
            if not hasattr(_ZSTD, "d"):
                _ZSTD.d = zstandard.ZstdDecompressor()
            raw = _ZSTD.d.decompress(body)
        else:
            raw = body
        chunk = np.frombuffer(raw, dtype="<u2").reshape(self.rows_per_chunk, self.width)
        c0 = self.first_row + j * self.rows_per_chunk
        out[...] = chunk[r0 - c0:r1 - c0]


def _crc_ok(data, stored: bytes) -> bool:
    return np.uint32(google_crc32c.value(bytes(data))).tobytes() == bytes(stored)

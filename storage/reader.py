"""Streaming reads over one or many stores/writer groups with bounded memory.

Batches are row ranges of one writer group, whole chunks where possible. The chunks of a
batch are read and decoded (shard.py; zarr-python for remote stores and blosc) on a thread
pool (``threads`` at once) straight into the batch's preallocated arrays; with ``prefetch=n`` the next n batches are read while the caller works
on the current one (small batches need more than one ahead to keep ``threads`` chunks in
flight). ``max_bytes`` bounds everything the reader holds: the caller's batch, the ones
being read (and with ``shuffle`` a permuted copy) and ``threads`` chunks' decode buffers
— tests/storage measure it with tracemalloc. ``sequences()`` yields whole sequences in
order (attention-included replay needs them): its batches start and end on sequence
boundaries, so a sequence is never stitched from two reads. Both take ``runs`` to read only
some sequences: (store index, writer, k0, k1) ranges of a writer group's sequence index
(a data-parallel worker reads only its partitions). ``bytes_read`` counts what the reader
fetched: compressed chunk bytes of the ``hidden`` arrays (the shard index included) on the
direct path, raw bytes otherwise and for the 16-byte-per-row columns.

Rows of format-3 stores are checked against their sequences' checksums as they are read
(checksum.py; on the pool threads, crc32c releases the GIL): a chunk file swapped for
another store's, which its own crc32c cannot tell, is an error naming the rows and files,
not wrong data. ``check=False`` skips it.

bf16 rows come back as numpy uint16 bit patterns (zero-copy, and numpy has no bfloat16);
``Batch.hidden_torch()`` / ``SequenceRows.hidden_torch()`` / ``as_bf16_tensor`` view them
as ``torch.bfloat16`` without a copy.
"""
from __future__ import annotations

import collections
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np

from .schema import ROW_ARRAYS, StoreError
from .shard import ShardFile, row_bytes
from .store import CaptureStore

# Decode room per in-flight chunk, in raw chunk sizes: the compressed blob (≤ ~1× raw for
# incompressible rows) plus a decoded copy for chunks read only in part (shard.py);
# zarr-python's own path (remote stores, blosc) also holds the shard's bytes and its own buffers.
DECODE_FACTOR_DIRECT = 2.2
DECODE_FACTOR_ZARR = 4.5


def as_bf16_tensor(bits: np.ndarray):
    """uint16 bf16 bit patterns → a ``torch.bfloat16`` tensor of the same shape (no copy)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16)


@dataclass
class Batch:
    hidden: np.ndarray        # uint16 [n, hc_mult*hidden]: bf16 bit patterns
    next_token: np.ndarray    # int32 [n]
    position: np.ndarray      # int32 [n]
    seq: np.ndarray           # int64 [n]
    store: str
    writer: str
    first_row: int            # row of hidden[0] in its group (before any shuffle)

    def __len__(self) -> int:
        return self.seq.shape[0]

    @property
    def nbytes(self) -> int:
        return self.hidden.nbytes + self.next_token.nbytes + self.position.nbytes + self.seq.nbytes

    def hidden_torch(self, hc_mult: int | None = None):
        """The rows as ``torch.bfloat16`` [n, width], or [n, hc_mult, hidden] (no copy)."""
        t = as_bf16_tensor(self.hidden)
        return t if hc_mult is None else t.view(t.shape[0], hc_mult, -1)


@dataclass
class SequenceRows:
    seq: int
    prompt_id: str
    replica: int
    writer: str
    hidden: np.ndarray        # uint16 [T, width], views into the batch it was read with
    next_token: np.ndarray
    position: np.ndarray

    def hidden_torch(self, hc_mult: int | None = None):
        t = as_bf16_tensor(self.hidden)
        return t if hc_mult is None else t.view(t.shape[0], hc_mult, -1)


class _Group(NamedTuple):
    """A writer group this reader reads, with the rows committed when the reader opened it."""
    store: CaptureStore
    writer: str
    rows: int


class _Span(NamedTuple):
    """A writer group's sequences [k0, k1) (None, None: all of them)."""
    store: CaptureStore
    writer: str
    rows: int                 # the group's committed rows
    k0: int | None
    k1: int | None


class _Read(NamedTuple):
    """One batch to read: rows [r0, r1) of a writer group."""
    store: CaptureStore
    writer: str
    r0: int
    r1: int


class _SequenceRead(NamedTuple):
    """A batch of whole sequences: rows [read.r0, read.r1) are sequences [k0, k1) of ``index``."""
    read: _Read
    index: dict[str, np.ndarray]
    k0: int
    k1: int


class StoreReader:
    """Reads committed rows of ``stores`` (paths, URLs or open stores), optionally only the
    writer groups named in ``writers``. Committed counts are read once, at construction:
    rows committed later are not seen (a consistent snapshot of a store being written).
    ``threads``: chunks decoded at once at most (default: cores, at most 16); a
    ``max_bytes`` too small for that many decode buffers runs fewer at once instead of
    failing. ``direct=False`` reads through zarr-python only (benchmarks compare the two).
    ``check``: rows against their sequences' checksums (format-3 stores)."""

    def __init__(self, stores: str | CaptureStore | Sequence[str | CaptureStore],
                 writers: Sequence[str] | None = None, threads: int | None = None,
                 direct: bool | None = None, check: bool = True):
        if isinstance(stores, (str, CaptureStore)) or hasattr(stores, "__fspath__"):
            stores = [stores]
        self.stores = [s if isinstance(s, CaptureStore) else CaptureStore.open(str(s)) for s in stores]
        if not self.stores:
            raise ValueError("no stores to read")
        widths = {s.meta.row_width for s in self.stores}
        if len(widths) > 1:
            raise StoreError(f"stores disagree on row width: "
                             f"{ {s.path: s.meta.row_width for s in self.stores} }")
        self.width = widths.pop()
        self.hc_mult = self.stores[0].meta.hc_mult
        self.groups: list[_Group] = []
        for s in self.stores:
            for w in s.writer_names():
                if writers is None or w in writers:
                    self.groups.append(_Group(s, w, s.committed(w).rows))
        self.threads = threads or min(16, os.cpu_count() or 1)
        self.direct = direct
        self.check = check
        self._checks: dict[tuple[str, str], object] = {}  # (store, writer) → SequenceCheck, made on first read
        self._checks_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="requant-read")
        self.decoders = self.threads  # chunks in flight at once; fewer under a tight max_bytes
        self._slots = threading.BoundedSemaphore(self.threads)
        self._ahead: ThreadPoolExecutor | None = None  # batch reads ahead, made on first use
        self._ahead_n = 0
        self._index: dict[tuple[int, str], dict[str, np.ndarray]] = {}
        self._counted = threading.Lock()
        self.bytes_read = 0

    @property
    def rows(self) -> int:
        return sum(g.rows for g in self.groups)

    @property
    def row_bytes(self) -> int:
        return row_bytes(self.width)

    # -- planning -----------------------------------------------------------------------
    def _cap(self, s: CaptureStore, max_rows: int | None, max_bytes: int | None, held: int) -> int | None:
        """Rows per batch so that ``held`` batches plus decode buffers fit in ``max_bytes``;
        sets how many chunks decode at once (as many threads as leave room for a whole
        chunk per held batch — 512 MiB beside three held batches of DSV4's 32 MiB chunks
        fits 5 decode threads' buffers, not 16)."""
        cap = max_rows
        if max_bytes is not None:
            chunk = s.layout.rows_per_chunk
            factor = DECODE_FACTOR_DIRECT if self._fast(s) else DECODE_FACTOR_ZARR
            per_thread = int(factor * chunk * self.row_bytes)
            batches = held * chunk * self.row_bytes
            fit = min(self.threads, (max_bytes - batches) // per_thread) if max_bytes > batches else 0
            if fit < 1:
                raise ValueError(f"max_bytes {max_bytes} is below one chunk of {s.path} plus decode buffers "
                                 f"({batches + per_thread} B for {held} batches of {chunk}-row chunks of "
                                 f"{self.row_bytes} B and one decode thread)")
            self._limit_decoders(fit)
            by_bytes = (max_bytes - fit * per_thread) // (held * self.row_bytes)
            cap = by_bytes if cap is None else min(cap, by_bytes)
        return cap

    def _limit_decoders(self, n: int) -> None:
        if n < self.decoders:  # the smallest any store of this reader allows
            self.decoders = n
            self._slots = threading.BoundedSemaphore(n)

    def _group_index(self, s: CaptureStore, w: str) -> dict[str, np.ndarray]:
        key = (self.stores.index(s), w)
        if key not in self._index:
            self._index[key] = s.index(w)
        return self._index[key]

    def _selected(self, runs: Sequence[tuple[int, str, int, int]] | None) -> list[_Span]:
        """One span per run; every whole group without ``runs``."""
        if runs is None:
            return [_Span(s, w, n, None, None) for s, w, n in self.groups]
        known = {(self.stores.index(s), w): (s, n) for s, w, n in self.groups}
        out = []
        for si, w, k0, k1 in runs:
            if (si, w) not in known:
                raise ValueError(f"run over store {si} writer {w!r}: not a group of this reader")
            s, n = known[(si, w)]
            if not 0 <= k0 < k1 <= s.committed(w).sequences:
                raise ValueError(f"{s.group_path(w)}: sequences [{k0}, {k1}) outside the committed index")
            out.append(_Span(s, w, n, k0, k1))
        return out

    def run_rows(self, runs: Sequence[tuple[int, str, int, int]]) -> int:
        """Rows in ``runs`` (sequence ranges; see ``sequences``)."""
        total = 0
        for s, w, _, k0, k1 in self._selected(runs):
            total += int(self._group_index(s, w)["length"][k0:k1].sum())
        return total

    def _plan(self, max_rows: int | None, max_bytes: int | None, held: int,
              runs: Sequence[tuple[int, str, int, int]] | None = None) -> list[_Read]:
        plan = []
        for s, w, n, k0, k1 in self._selected(runs):
            chunk = s.layout.rows_per_chunk
            lo, hi = 0, n
            if k0 is not None:  # the run's rows: its sequences are contiguous in the group
                idx = self._group_index(s, w)
                lo, hi = int(idx["first_row"][k0]), int(idx["first_row"][k1 - 1] + idx["length"][k1 - 1])
                if hi - lo != int(idx["length"][k0:k1].sum()):
                    raise ValueError(f"{s.group_path(w)}: sequences [{k0}, {k1}) are not contiguous rows")
            cap = self._cap(s, max_rows, max_bytes, held)
            if cap is None:  # no bound: the group (or run) in one batch
                plan += [_Read(s, w, lo, hi)] if hi > lo else []
                continue
            if cap >= chunk:
                cap -= cap % chunk  # whole chunks: no chunk decoded twice
            r0 = lo
            while r0 < hi:  # batches end on the group's cap grid: a run's inner batches are whole chunks
                r1 = min(hi, (r0 // cap + 1) * cap)
                plan.append(_Read(s, w, r0, r1))
                r0 = r1
        return plan

    def _sequence_plan(self, max_rows: int | None, max_bytes: int | None, held: int,
                       runs: Sequence[tuple[int, str, int, int]] | None = None) -> list[_SequenceRead]:
        """Batches of whole sequences."""
        plan = []
        for s, w, n, lo, hi in self._selected(runs):
            idx = self._group_index(s, w)
            first, length = idx["first_row"], idx["length"]
            cap = self._cap(s, max_rows, max_bytes, held) or max(n, 1)
            k = 0 if lo is None else lo
            end = len(first) if hi is None else hi
            while k < end:
                r0 = int(first[k])
                if int(length[k]) > cap:
                    raise ValueError(f"{s.group_path(w)}: sequence {int(idx['seq'][k])} has {int(length[k])} "
                                     f"rows; the memory bound allows {cap} per batch — raise max_bytes/max_rows")
                # the last sequence that still ends within r0 + cap
                k1 = min(int(np.searchsorted(first + length, r0 + cap, side="right")), end)
                plan.append(_SequenceRead(_Read(s, w, r0, int(first[k1 - 1] + length[k1 - 1])), idx, k, k1))
                k = k1
        return plan

    # -- iteration ----------------------------------------------------------------------
    def batches(self, max_rows: int | None = None, max_bytes: int | None = None,
                shuffle: bool = False, seed: int = 0, prefetch: int = 1,
                runs: Sequence[tuple[int, str, int, int]] | None = None) -> Iterator[Batch]:
        """All committed rows (or the rows of ``runs``, see ``sequences``), in batches of at
        most ``max_rows`` rows and within ``max_bytes`` of reader memory (no bound: one batch
        per writer group or run). With ``shuffle`` the batch order and the rows within each
        batch are permuted (seeded, reproducible, the same for any ``prefetch``).
        ``prefetch``: batches read ahead."""
        prefetch = int(prefetch)
        plan = self._plan(max_rows, max_bytes, held=2 + prefetch + int(shuffle), runs=runs)
        rng = np.random.default_rng(seed)
        seeds: list[int | None] = [None] * len(plan)
        if shuffle:  # per-batch seeds drawn here: batches may be read out of order
            order, draws = rng.permutation(len(plan)), rng.integers(0, 2**63, len(plan))
            plan, seeds = [plan[i] for i in order], [int(x) for x in draws]

        def load(p: tuple[_Read, int | None]) -> Batch:
            read, batch_seed = p
            b = self._read(*read)
            if batch_seed is not None:
                perm = np.random.default_rng(batch_seed).permutation(len(b))
                b = Batch(b.hidden[perm], b.next_token[perm], b.position[perm], b.seq[perm], b.store, b.writer,
                          b.first_row)
            return b

        yield from self._stream(list(zip(plan, seeds)), load, prefetch)

    def sequences(self, max_rows: int | None = None, max_bytes: int | None = None,
                  prefetch: int = 1, runs: Sequence[tuple[int, str, int, int]] | None = None
                  ) -> Iterator[SequenceRows]:
        """Whole sequences in writer and index order; a sequence larger than the bound
        is an error naming it. ``runs``: only sequences k0 ≤ k < k1 of each
        (store index, writer, k0, k1), in the order given."""
        prefetch = int(prefetch)
        plan = self._sequence_plan(max_rows, max_bytes, held=2 + prefetch, runs=runs)

        def load(p: _SequenceRead) -> tuple[Batch, _SequenceRead]:
            return self._read(*p.read), p

        for b, p in self._stream(plan, load, prefetch):
            idx = p.index
            for k in range(p.k0, p.k1):
                o, ln = int(idx["first_row"][k]) - p.read.r0, int(idx["length"][k])
                yield SequenceRows(int(idx["seq"][k]), str(idx["prompt_id"][k]), int(idx["replica"][k]),
                                   p.read.writer, b.hidden[o:o + ln], b.next_token[o:o + ln], b.position[o:o + ln])

    def _stream(self, plan: list, load: Callable, prefetch: int) -> Iterator:
        if prefetch <= 0:
            for p in plan:
                yield load(p)
            return
        if self._ahead is None or self._ahead_n < prefetch:
            if self._ahead is not None:
                self._ahead.shutdown(wait=False)
            self._ahead = ThreadPoolExecutor(max_workers=prefetch, thread_name_prefix="requant-prefetch")
            self._ahead_n = prefetch
        ahead = collections.deque(self._ahead.submit(load, p) for p in plan[:prefetch])
        for i in range(len(plan)):
            item = ahead.popleft().result()
            if i + prefetch < len(plan):
                ahead.append(self._ahead.submit(load, plan[i + prefetch]))
            yield item

    def _read(self, s: CaptureStore, w: str, r0: int, r1: int) -> Batch:
        g = s.group(w)
        arrays = {a: s.array(w, a, g) for a in ROW_ARRAYS}
        cols = {a: np.empty((r1 - r0,) + arr.shape[1:], dtype=arr.dtype) for a, arr in arrays.items()}
        chunk, per_shard = s.layout.rows_per_chunk, s.layout.rows_per_shard
        fast = self._fast(s)
        slots = self._slots
        starts = [r0] + list(range(r0 - r0 % chunk + chunk, r1, chunk))
        shards: dict[int, ShardFile] = {}
        try:
            if fast:
                for k in {c0 // per_shard for c0 in starts}:
                    shards[k] = s.hidden_shard(w, k)
                    self._count(shards[k].index_bytes)

            def fill(a: str, c0: int) -> None:
                c1 = min(c0 - c0 % chunk + chunk, r1)
                with slots:  # decode buffers in flight stay within the memory bound
                    if fast:
                        self._count(shards[c0 // per_shard].read_rows(c0, c1, cols[a][c0 - r0:c1 - r0]))
                    else:
                        cols[a][c0 - r0:c1 - r0] = arrays[a][c0:c1]
                        self._count(cols[a][c0 - r0:c1 - r0].nbytes)

            def fill_column(a: str) -> None:  # 16 B/row: one zarr call per batch, not per chunk
                try:
                    cols[a][...] = arrays[a][r0:r1]
                except Exception as e:  # noqa: BLE001 — decode/checksum errors vary by codec
                    raise StoreError(f"{a} column: {type(e).__name__}: {e}") from e
                self._count(cols[a].nbytes)

            futs = [self._pool.submit(fill, "hidden", c0) for c0 in starts]
            futs += [self._pool.submit(fill_column, a) for a in ROW_ARRAYS if a != "hidden"]
            for f in futs:
                f.result()
        except Exception as e:  # noqa: BLE001 — decode/checksum errors vary by codec
            why = str(e) if isinstance(e, StoreError) else f"{type(e).__name__}: {e}"  # (names its file or column)
            raise StoreError(f"{s.group_path(w)}: rows {r0}–{r1} unreadable: {why}") from e
        self._check_rows(s, w, r0, r1, cols)
        return Batch(store=s.path, writer=w, first_row=r0, **cols)

    def _count(self, n: int) -> None:
        with self._counted:
            self.bytes_read += n

    def _check_rows(self, s: CaptureStore, w: str, r0: int, r1: int, cols: dict) -> None:
        """Rows [r0, r1) against their sequences' checksums: sequences split among the pool
        threads in spans of about one chunk; a sequence cut by the batch's edge is checked
        once its other pieces have been read."""
        if not self.check or not s.checksummed:
            return
        with self._checks_lock:
            check = self._checks.get((s.path, w))
            if check is None:
                check = self._checks[(s.path, w)] = s.sequence_check(w)
        spans = check.spans(r0, r1)
        step = max(1, s.layout.rows_per_chunk)
        groups, cur, rows = [], [], 0
        for sp in spans:
            cur.append(sp)
            rows += sp[2] - sp[1]
            if rows >= step:
                groups.append(cur)
                cur, rows = [], 0
        if cur:
            groups.append(cur)

        def run(group: list) -> list[str]:
            return [p for k, a, b in group
                    for p in check.settle(k, a, b, check.piece(cols, r0, a, b), cols["seq"][a - r0:b - r0])]

        problems = [p for ps in self._pool.map(run, groups) for p in ps]
        if problems:
            raise StoreError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))

    def _fast(self, s: CaptureStore) -> bool:
        return self.direct is not False and s.direct_io

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.shutdown(wait=False)
        self._pool.shutdown(wait=False)

    def __enter__(self) -> "StoreReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

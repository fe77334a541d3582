"""Append-only writer for one writer group: a background pipeline behind a bounded queue.

    producer ─append_sequence─▶ queue (bounded) ─▶ writer thread ─▶ commit queue (1) ─▶ committer
                                                    seals batches,     waits for the batch's
                                                    assigns rows,      shards, writes the small
                                                    submits hidden     columns and the index,
                                                    shards to a pool   fsyncs, then commits

Crash safety: rows are written past the committed count, then their sequences' index
entries; on local stores every touched file and directory is fsynced; only then is the
group's commit record {"rows", "sequences"} replaced — one atomic object write (zarr's tmp
file + rename locally, a single PUT on object stores). A crash at any point leaves the
previous commit intact; rows past it are invisible and are overwritten when a writer
reopens the group. Every object is replaced whole (tmp + rename), so committed rows that
share a shard with new ones are never exposed to a torn write.

Encoding batch k+1 overlaps committing batch k; at most two sealed batches and one
filling batch (``flush_bytes`` each) plus ``queue_size`` sequences are held in memory.
One writer per group: local groups are locked (flock on the group directory, released by
the kernel when the process dies); object stores cannot be locked — give each process its
own writer name.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .checksum import commit_record, entry_crc, row_crcs
from .schema import COMMIT_ATTR, CRC_ARRAY, ROW_ARRAYS, CorruptStoreError, StoreError, index_arrays
from .durable import fsync_paths
from .shard import row_bytes, shard_key, shard_path, write_shard
from .store import CaptureStore

_STOP = object()  # queue entry: commit what is queued, then end


@dataclass
class WriterStats:
    rows: int = 0               # committed rows (including those of earlier sessions)
    sequences: int = 0
    bytes: int = 0              # raw bytes committed by this writer session
    queued: int = 0             # sequences waiting in the queue
    blocked_seconds: float = 0  # time appenders spent waiting on a full queue (back-pressure)
    dropped: int = 0            # always 0: appends block rather than drop


class _Sequence(NamedTuple):
    """One appended sequence, as queued."""
    seq_id: int
    hidden: np.ndarray       # uint16 [T, width]
    next_token: np.ndarray   # int32 [T]
    position: np.ndarray     # int32 [T]
    prompt_id: str
    replica: int

    @property
    def rows(self) -> int:
        return self.hidden.shape[0]


class _Flush(NamedTuple):
    """Queue entry: commit what is queued, then set ``done``."""
    done: threading.Event


@dataclass
class _Sealed:
    """A batch of whole sequences with its rows [r0, r1) and index entries [m0, m1)."""
    r0: int
    r1: int
    m0: int
    m1: int
    items: list[_Sequence]
    shard_futs: list[Future] = field(default_factory=list)
    events: list[threading.Event] = field(default_factory=list)  # flushes this commit answers

    @property
    def rows(self) -> int:
        return self.r1 - self.r0


def _as_uint16_rows(hidden, width: int, where: str) -> np.ndarray:
    """bf16 rows [T, width] (or [T, hc, H]) from a torch tensor or uint16/bf16 numpy array."""
    if hasattr(hidden, "detach"):  # torch
        import torch

        if hidden.dtype != torch.bfloat16:
            raise ValueError(f"{where}: hidden must be bfloat16, got {hidden.dtype}")
        hidden = hidden.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint16)
    else:
        hidden = np.asarray(hidden)
        if hidden.dtype != np.uint16:
            raise ValueError(f"{where}: hidden must be torch.bfloat16 or its uint16 bit pattern, got {hidden.dtype}")
    if hidden.ndim == 3:
        hidden = hidden.reshape(hidden.shape[0], -1)
    if hidden.ndim != 2 or hidden.shape[1] != width:
        raise ValueError(f"{where}: hidden must be [tokens, {width}], got {tuple(hidden.shape)}")
    return np.array(hidden, copy=True)  # the caller may reuse its (pinned) buffer


class GroupWriter:
    """Writes whole sequences into ``writers/<name>``; resumes after the last commit.

    ``durable``: fsync before every commit (local stores). ``flush_bytes``: raw bytes per
    commit batch (rounded to whole shards, at least one). ``threads``: encode/write pool.
    ``direct``: None (default) writes hidden shards with shard.py where it can (local, zstd or
    no compression); False forces zarr-python's own path (benchmarks compare the two).
    """

    def __init__(self, store: CaptureStore, name: str, queue_size: int = 16, durable: bool = True,
                 flush_rows: int | None = None, threads: int | None = None, flush_bytes: int = 256 << 20,
                 direct: bool | None = None):
        self.store, self.name = store, name
        self.path = store.group_path(name)
        try:
            self.g = store.create_group(name)
        except OSError as e:  # zarr writes several documents concurrently: name the group, not one of them
            raise OSError(e.errno, f"{self.path}: cannot create the writer group ({e.strerror or e})") from e
        self._lock = store.lock_group(name)
        local = store.group_dir(name)
        if local is not None:
            for p in local.rglob("*.partial"):  # leftovers of writes a crash interrupted
                p.unlink(missing_ok=True)
        try:
            rows, seqs = store.committed(name)
            self.stats = WriterStats(rows=rows, sequences=seqs)
            self.width = store.meta.row_width
            self.durable = durable and local is not None
            self.layout = lay = store.layout
            # Whole hidden shards are encoded and written on the pool (shard.py), not through
            # zarr-python's one event-loop thread per process.
            self.direct = store.direct_io and direct is not False
            self.threads = threads or min(16, os.cpu_count() or 1)
            shard = lay.rows_per_shard
            self.flush_rows = flush_rows or max(shard, min(self.threads * shard,
                                                           flush_bytes // row_bytes(self.width) // shard * shard))
            self._arrays = {a: store.array(name, a, self.g).with_config({"write_empty_chunks": True})
                            for a in ROW_ARRAYS}
            self._index = {a: store.array(name, f"index/{a}", self.g).with_config({"write_empty_chunks": True})
                           for a in index_arrays(store.meta.format)}
            # rows of the last, partial hidden shard (rewritten whole by the next batch) and the
            # future of its last write (the next write of that shard waits for it: order)
            self._tail = self._load_tail(rows) if self.direct else None
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise
        self._tail_fut: Future | None = None
        self._next_row, self._next_seq = rows, seqs
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix=f"requant-encode-{name}")
        # a commit's fsyncs run at once (the journal takes them in one flush), never behind encode work
        self._fsyncs = ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"requant-fsync-{name}")
        self._q: queue.Queue = queue.Queue(maxsize=queue_size)
        self._cq: queue.Queue = queue.Queue(maxsize=1)
        self._buf: list[_Sequence] = []
        self._buf_rows = 0
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._guard, args=(self._run,), name=f"requant-writer-{name}",
                                        daemon=True)
        self._committer = threading.Thread(target=self._guard, args=(self._commit_loop,),
                                           name=f"requant-commit-{name}", daemon=True)
        self._thread.start()
        self._committer.start()

    # -- producer side ------------------------------------------------------------------
    def append_sequence(self, seq_id: int, hidden, next_token, position, prompt_id: str = "",
                        replica: int = 0) -> None:
        """Queue one whole sequence (rows in position order). Blocks while the queue is full.

        ``hidden``: [T, hc_mult*hidden] or [T, hc_mult, hidden], torch.bfloat16 (any device)
        or numpy uint16 bf16 bit patterns; copied before this returns. ``next_token`` and
        ``position``: T integers (stored int32)."""
        if self._closed:
            raise StoreError(f"{self.path}: writer is closed")
        where = f"{self.path} seq {seq_id}"
        h = _as_uint16_rows(hidden, self.width, where)
        nt = np.asarray(next_token.cpu() if hasattr(next_token, "cpu") else next_token)
        pos = np.asarray(position.cpu() if hasattr(position, "cpu") else position)
        t = h.shape[0]
        if t == 0:
            raise ValueError(f"{where}: empty sequence")
        for label, arr in (("next_token", nt), ("position", pos)):
            if arr.shape != (t,) or not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"{where}: {label} must be {t} integers, got {arr.dtype} {tuple(arr.shape)}")
        item = _Sequence(int(seq_id), h, nt.astype(np.int32), pos.astype(np.int32), str(prompt_id), int(replica))
        self._put(self._q, item)
        self.stats.queued = self._q.qsize()

    def flush(self, wait: bool = True) -> None:
        """Commit everything queued so far; returns once committed, or at once with
        ``wait=False`` (the pipeline commits in the background)."""
        done = threading.Event()
        self._put(self._q, _Flush(done))
        while wait and not done.wait(0.05):
            self._check()
        self._check()

    def close(self) -> None:
        """Commit what is queued, stop the threads and release the group."""
        if self._closed:
            return
        self._closed = True
        try:
            self._put(self._q, _STOP)
        except StoreError:  # the pipeline died (the error is raised below): still wake the writer
            while self._thread.is_alive():  # thread if it waits for work, or it never ends
                try:
                    self._q.put(_STOP, timeout=0.1)
                    break
                except queue.Full:
                    continue
        self._thread.join()
        self._committer.join()
        self._pool.shutdown()
        self._fsyncs.shutdown()
        if self._lock is not None:
            self._lock.release()
        self._check()

    def __enter__(self) -> "GroupWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _put(self, q: queue.Queue, item) -> None:
        t0 = time.perf_counter()
        while True:
            self._check()
            try:
                q.put(item, timeout=0.1)
                break
            except queue.Full:
                continue
        if q is self._q:
            self.stats.blocked_seconds += time.perf_counter() - t0

    def _check(self) -> None:
        if self._error is not None:
            raise StoreError(f"{self.path}: writer failed: {self._error}") from self._error

    def _guard(self, fn) -> None:
        try:
            fn()
        except BaseException as e:  # surfaced to the producer on its next call
            self._error = self._error or e

    # -- writer thread: batches and hidden shards ---------------------------------------
    def _run(self) -> None:
        events: list = []
        while True:
            item = self._q.get()
            if item is _STOP:
                self._seal(events)
                self._put(self._cq, _STOP)
                return
            if isinstance(item, _Flush):
                events.append(item.done)
                self._seal(events)
                events = []
                continue
            self._buf.append(item)
            self._buf_rows += item.rows
            if self._buf_rows >= self.flush_rows:
                self._seal([])

    def _seal(self, events: list) -> None:
        if not self._buf and not events:
            return
        r0, m0 = self._next_row, self._next_seq
        b = _Sealed(r0, r0 + self._buf_rows, m0, m0 + len(self._buf), self._buf, events=events)
        self._buf, self._buf_rows = [], 0
        if b.items and self.direct:
            b.shard_futs = self._submit_shards(b)
        self._next_row, self._next_seq = b.r1, b.m1
        self._put(self._cq, b)

    def _submit_shards(self, b: _Sealed) -> list[Future]:
        """One pool task per hidden shard the batch touches; the first may continue the
        previous batch's partial shard (its rows are kept in ``self._tail``)."""
        shard = self.layout.rows_per_shard
        pieces, start = [], b.r0 - b.r0 % shard
        if self._tail is not None and len(self._tail):
            pieces.append(self._tail)
        futs = []
        row = b.r0
        items = iter(b.items)
        it, off = next(items), 0
        while row < b.r1:
            end = min(start + shard, b.r1)
            while row < end:  # gather views of the items' rows up to the shard's end
                take = min(end - row, it.rows - off)
                pieces.append(it.hidden[off:off + take])
                row, off = row + take, off + take
                if off == it.rows and row < b.r1:
                    it, off = next(items), 0
            k = start // shard
            prev = self._tail_fut if start < b.r0 else None
            fut = self._pool.submit(self._write_shard, k, pieces, end - start, prev)
            futs.append(fut)
            if end - start < shard:  # partial: the next batch rewrites it
                self._tail = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
                self._tail_fut = fut
            else:
                self._tail, self._tail_fut = None, None
            pieces, start = [], end
        return futs

    def _load_tail(self, rows: int) -> np.ndarray | None:
        shard = self.layout.rows_per_shard
        if rows % shard == 0:
            return None
        try:
            return np.asarray(self._arrays["hidden"][rows - rows % shard:rows])
        except Exception as e:  # noqa: BLE001 — codec errors differ by codec
            raise CorruptStoreError(f"{self.path}/hidden: the last partial shard (committed rows "
                                    f"{rows - rows % shard}–{rows}) is unreadable: {type(e).__name__}: {e}") from e

    def _write_shard(self, k: int, pieces: list, nrows: int, prev: Future | None) -> dict:
        """Write hidden shard ``k`` (its first ``nrows`` rows); returns its complete chunks'
        encodings, which the next write of a partial shard reuses."""
        cached = prev.result() if prev is not None else {}
        rows = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        return write_shard(shard_path(self.store.group_dir(self.name), k), rows, nrows, self.layout, self.width,
                           cached, self.durable)

    # -- committer thread ---------------------------------------------------------------
    def _commit_loop(self) -> None:
        while True:
            try:
                b = self._cq.get(timeout=0.1)
            except queue.Empty:
                if self._error is not None:  # the writer thread died: nothing more comes
                    return
                continue
            if b is _STOP:
                return
            if b.items:
                self._commit(b)
            for e in b.events:
                e.set()

    def _commit(self, b: _Sealed) -> None:
        st, items = self.stats, b.items
        for f in b.shard_futs:  # hidden data first (direct shards)
            f.result()
        cols = {
            "next_token": np.concatenate([it.next_token for it in items]),
            "position": np.concatenate([it.position for it in items]),
            "seq": np.concatenate([np.full(it.rows, it.seq_id, dtype=np.int64) for it in items]),
        }
        if not self.direct:
            cols["hidden"] = np.concatenate([it.hidden for it in items])
        for a in ROW_ARRAYS:  # past the committed count
            arr = self._arrays[a]
            if arr.shape[0] < b.r1:
                arr.resize((b.r1,) + arr.shape[1:])  # in place: metadata only
            if a in cols:
                self._write(a, arr, slice(b.r0, b.r1), cols[a])
        lengths = np.array([it.rows for it in items], dtype=np.int64)
        index = {
            "seq": np.array([it.seq_id for it in items], dtype=np.int64),
            "first_row": b.r0 + np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64),
            "length": lengths,
            "replica": np.array([it.replica for it in items], dtype=np.int32),
            "prompt_id": np.array([it.prompt_id for it in items], dtype=object).astype(str),
        }
        if CRC_ARRAY in self._index:
            index[CRC_ARRAY] = self._checksums(items, index)
        for a, values in index.items():  # then the index entries
            arr = self._index[a]
            if arr.shape[0] < b.m1:
                arr.resize((b.m1,) + arr.shape[1:])
            self._write(f"index/{a}", arr, slice(b.m0, b.m1), values)
        if self.durable:
            fsync_paths(self.store.group_dir(self.name), self._touched(b), self._fsyncs)
        commit = commit_record(self.store.meta.uid, b.r1, b.m1) if self.store.checksummed else \
            {"rows": b.r1, "sequences": b.m1}
        self.g.attrs[COMMIT_ATTR] = commit  # the atomic commit
        if self.durable:
            fsync_paths(self.store.group_dir(self.name), ["zarr.json"])
        st.rows, st.sequences = b.r1, b.m1
        st.bytes += b.rows * row_bytes(self.width)

    def _write(self, rel: str, arr, where: slice, values) -> None:
        """A zarr write past the commit; it rewrites the chunk it lands in (read back first)."""
        try:
            arr[where] = values
        except OSError as e:
            raise OSError(e.errno, f"writing {self.path}/{rel}: {e.strerror or e}") from e
        except Exception as e:  # noqa: BLE001 — a damaged chunk read back: codec errors vary
            raise CorruptStoreError(f"{self.path}/{rel}: the chunk holding rows {where.start}–{where.stop} is "
                                    f"unreadable ({type(e).__name__}: {e})") from e

    def _checksums(self, items: list[_Sequence], index: dict) -> np.ndarray:
        """index/crc rows: each sequence's row checksums and its entry checksum (checksum.py)."""
        out = np.empty((len(items), 4), dtype=np.uint32)
        uid = self.store.meta.uid
        for j, it in enumerate(items):
            rows = row_crcs(it.hidden, it.next_token, it.position)
            out[j, :3] = rows
            out[j, 3] = entry_crc(uid, it.seq_id, index["first_row"][j], index["length"][j], it.replica,
                                  index["prompt_id"][j], rows)
        return out

    def _touched(self, b: _Sealed) -> list[str]:
        """Files (relative to the group) this batch wrote, for fsync (with their directories)."""
        lay = self.layout
        shards = range(b.r0 // lay.rows_per_shard, (b.r1 - 1) // lay.rows_per_shard + 1)
        ichunks = range(b.m0 // lay.index_rows_per_chunk, (b.m1 - 1) // lay.index_rows_per_chunk + 1)
        names = [f"{a}/c/{s}" for a in ROW_ARRAYS[1:] for s in shards]
        names += [shard_key(s) for s in shards]  # direct shards: fsynced already, dirs not
        idx = index_arrays(self.store.meta.format)
        names += [f"index/{a}/c/{c}" + ("/0" if a == CRC_ARRAY else "") for a in idx for c in ichunks]
        names += [f"{a}/zarr.json" for a in ROW_ARRAYS] + [f"index/{a}/zarr.json" for a in idx]
        return names

"""The capture pipeline between a hook and a store.

    hook thread:   add_step(...)  → copy rows into a staging slot (non_blocking) → queue
                   finish(req)    → queue
    writer thread: wait for the copy, split rows per request (SequenceAssembler), and on
                   finish append the whole sequence to the sink (a storage GroupWriter,
                   which has its own background thread). Commits come after ``idle_commit_s``
                   without new work (a quiet server's rows become visible) and at least every
                   ``commit_every_s`` under load; the thread wakes at most every ``batch_s``
                   and drains what queued meanwhile, so it rarely contends with the serving
                   thread for the GIL.

The hook never touches the store and never waits on I/O; it waits only when every staging
slot or queue entry is in use (back-pressure, visible in ``stats.blocked_seconds``). Rows
are never dropped silently: a finished request whose rows are incomplete is counted in
``dropped_sequences``/``dropped_rows`` and logged.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import numpy as np
import torch

from .assembler import IncompleteSequence, SequenceAssembler
from .sink import RowSink, open_store_sink
from .staging import HostStaging, Slot
from .status import PointState

log = logging.getLogger("requant.capture")
_STOP = object()  # queue entry: commit, then end


class _Rows(NamedTuple):
    """Queue entry: one forward's staged rows; the first ``counts[i]`` after the previous
    requests' belong to ``req_ids[i]``."""
    req_ids: list[str]
    counts: list[int]
    slot: Slot


class _Finish(NamedTuple):
    """Queue entry: request ``req_id`` is done with ``tokens`` (prompt + output ids)."""
    req_id: str
    tokens: list[int]
    prompt_id: str


class _Flush(NamedTuple):
    """Queue entry: commit, then set ``done``."""
    done: threading.Event


@dataclass
class CaptureStats:
    steps: int = 0                  # forward calls captured
    rows: int = 0                   # rows handed to the store (whole sequences)
    bytes: int = 0                  # hidden-state bytes of those rows
    sequences: int = 0
    dropped_sequences: int = 0      # finished requests that could not be written (must stay 0)
    dropped_rows: int = 0
    superseded_rows: int = 0        # recomputed positions / rejected speculative slots, not written
    blocked_seconds: float = 0.0    # time hooks waited for a staging slot or queue entry
    max_queued: int = 0
    oversized_steps: int = 0        # steps larger than rows_per_step (one-off buffers)

    def as_dict(self) -> dict:
        return asdict(self)


class Capturer:
    """Streams one capture point's rows into ``sink``; thread-safe producer side."""

    def __init__(self, sink: RowSink, width: int, rows_per_step: int, ids_offset: int = 0, slots: int = 8,
                 queue_size: int = 256, commit_every_s: float = 30.0, idle_commit_s: float = 1.0,
                 batch_s: float = 0.02, replica: int = 0, first_seq_id: int = 0, pin: bool | None = None,
                 status=None, test_commit_delay_s: float = 0.0):
        """``status``: a callable taking this pipeline's state (``PipelineStatus.publisher``).
        ``test_commit_delay_s`` (tests only: a slow store): idle and periodic commits happen
        this much later than due; the writer thread keeps taking work and beating meanwhile."""
        self.sink, self.width, self.replica = sink, width, replica
        self.staging = HostStaging(width, rows_per_step, slots, pin)
        self.assembler = SequenceAssembler(ids_offset)
        self.commit_every_s, self.idle_commit_s, self.batch_s = commit_every_s, idle_commit_s, batch_s
        self._stats = CaptureStats()
        self._queue_blocked = 0.0
        self._next_seq = first_seq_id
        self._q: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._closed = False
        self._last_commit = time.monotonic()
        self._uncommitted = False
        self.test_commit_delay_s = test_commit_delay_s
        self._commit_due: float | None = None
        self._committed_seq, self._uncommitted_rows, self._commits = first_seq_id, 0, 0
        self._publish = status
        self._status_lock = threading.Lock()  # "busy" (producer) and "idle" (writer) never cross
        self._shown: PointState | None = None
        self._shown_at = 0.0
        self._report()
        self._thread = threading.Thread(target=self._run, name="requant-capture", daemon=True)
        self._thread.start()

    # -- producer side (hooks, runner) ---------------------------------------------------
    def add_step(self, req_ids: list[str], counts: list[int], hidden: torch.Tensor, input_ids: torch.Tensor,
                 positions: torch.Tensor, fresh: bool = False) -> None:
        """Rows of one forward: the first sum(counts) rows belong to req_ids in order.
        ``fresh``: ``hidden`` was allocated by this forward (not a reused buffer), so on a
        GPU its copy may overlap the next kernels (HostStaging side stream)."""
        self._check()
        total = sum(counts)
        if total == 0:
            return
        if hidden.shape[0] < total or input_ids.shape[0] < total or positions.shape[0] < total:
            raise ValueError(f"capture: step has {hidden.shape[0]} rows, {total} scheduled tokens")
        slot = self.staging.stage(hidden[:total].detach(), input_ids[:total], positions[:total], side_stream=fresh)
        self._put(_Rows(list(req_ids), list(counts), slot))
        self._stats.steps += 1

    def finish(self, req_id: str, tokens: list[int], prompt_id: str | None = None) -> None:
        """The request is done; ``tokens`` = prompt + output ids."""
        self._check()
        self._put(_Finish(req_id, list(tokens), req_id if prompt_id is None else prompt_id))

    def flush(self) -> None:
        """Wait until everything queued so far is processed and committed."""
        done = threading.Event()
        self._put(_Flush(done))
        while not done.wait(0.05):
            self._check()
        self._check()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._put(_STOP)
        except RuntimeError:
            pass  # the writer thread failed and ended; its error is raised below
        self._thread.join()
        try:
            self.sink.close()  # releases the writer group even after a failure
        except Exception:  # noqa: BLE001 — the sink's own report of the failure raised below
            if self._error is None:
                raise
        if self.assembler.open_requests:
            log.warning("requant capture: %d unfinished requests not written at close",
                        self.assembler.open_requests)
        self._check()

    def _put(self, item) -> None:
        try:
            self._q.put_nowait(item)
        except queue.Full:
            t0 = time.perf_counter()
            while True:
                self._check()
                try:
                    self._q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            self._queue_blocked += time.perf_counter() - t0
        self._stats.max_queued = max(self._stats.max_queued, self._q.qsize())
        if self._publish is not None:
            # After the put, under the lock the writer decides "idle" under: it either saw
            # this entry, or showed idle before it and is overwritten here. Only an idle →
            # busy change writes (once per quiet spell), so serving steps rarely touch the file.
            with self._status_lock:
                if self._shown is None or self._shown.idle:
                    self._show(replace(self._shown or PointState(idle=False), idle=False, queued=self._q.qsize()))

    @property
    def stats(self) -> CaptureStats:
        self._stats.blocked_seconds = self.staging.blocked_seconds + self._queue_blocked
        self._stats.oversized_steps = self.staging.oversized
        return self._stats

    def _check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"requant capture failed: {self._error}") from self._error

    # -- status (status.py) ---------------------------------------------------------------
    def _report(self, error: str = "") -> None:
        """Writer side: publish the state when it changed, else at most once a second (the beat)."""
        if self._publish is None:
            return
        with self._status_lock:
            open_requests = self.assembler.open_requests
            idle = self._q.empty() and not self._uncommitted and not open_requests and not error
            shown = self._shown
            if (shown is not None and shown.idle == idle and shown.committed_sequences == self._committed_seq
                    and not error and time.monotonic() - self._shown_at < 1.0):
                return
            self._show(PointState(idle=idle, queued=self._q.qsize(), open_requests=open_requests,
                                  pending_rows=self.assembler.rows() + self._uncommitted_rows,
                                  uncommitted_sequences=self._next_seq - self._committed_seq,
                                  committed_sequences=self._committed_seq, commits=self._commits, error=error))

    def _show(self, state: PointState) -> None:
        self._publish(state)
        self._shown, self._shown_at = state, time.monotonic()

    # -- writer thread --------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                try:
                    item = self._q.get(timeout=self.idle_commit_s)
                except queue.Empty:  # idle: commit, so a quiet server's rows become visible
                    self._commit()
                    self._report()
                    continue
                items = [item]
                if item is not _STOP:
                    time.sleep(self.batch_s)  # let a few steps queue up, then take them all
                    while True:
                        try:
                            items.append(self._q.get_nowait())
                        except queue.Empty:
                            break
                for item in items:
                    if self._handle(item):
                        return
                if self._uncommitted and time.monotonic() - self._last_commit > self.commit_every_s:
                    self._commit()
                self._report()
        except BaseException as e:  # surfaced to producers on their next call
            self._error = e
            log.exception("requant capture writer thread failed")
            try:
                self._report(error=f"{type(e).__name__}: {e}")
            except OSError:  # the status file itself failed: the beat stops, which says as much
                pass

    def _handle(self, item) -> bool:
        """Process one queue entry; True on stop."""
        if item is _STOP:
            self._commit(deferrable=False)
            self._report()
            return True
        if isinstance(item, _Rows):
            self._rows(*item)
        elif isinstance(item, _Finish):
            self._finish(*item)
        elif isinstance(item, _Flush):
            self._commit(deferrable=False)
            item.done.set()
        return False

    def _rows(self, req_ids: list[str], counts: list[int], slot: Slot) -> None:
        slot.wait()
        t = slot.rows
        hidden = slot.hidden[:t].view(torch.int16).numpy().view(np.uint16)
        ids = slot.input_ids[:t].numpy()
        pos = slot.positions[:t].numpy()
        # Copy out of the slot (it is reused): small slices (decode rows) one by one, so a
        # long request never pins a whole step's array; large ones (prefill) as views of
        # one copy of the step.
        step = None
        start = 0
        for r, n in zip(req_ids, counts):
            if n:
                if 4 * n < t:
                    h = hidden[start:start + n].copy()
                else:
                    step = hidden.copy() if step is None else step
                    h = step[start:start + n]
                self.assembler.add(r, pos[start:start + n].copy(), ids[start:start + n].copy(), h)
            start += n
        self.staging.release(slot)

    def _finish(self, req_id: str, tokens: list[int], prompt_id: str) -> None:
        pending_rows = self.assembler.rows(req_id)
        try:
            seq = self.assembler.finish(req_id, tokens)
        except IncompleteSequence as e:
            self._stats.dropped_sequences += 1
            self._stats.dropped_rows += pending_rows
            log.error("requant capture: %s — sequence not written", e)
            return
        if seq is None:
            return
        self.sink.append_sequence(self._next_seq, seq.hidden, seq.next_token, seq.position,
                                  prompt_id=prompt_id, replica=self.replica)
        self._next_seq += 1
        self._uncommitted = True
        self._uncommitted_rows += len(seq.position)
        st = self._stats
        st.sequences += 1
        st.rows += len(seq.position)
        st.bytes += seq.hidden.nbytes
        st.superseded_rows += seq.superseded

    def _commit(self, deferrable: bool = True) -> None:
        if self._uncommitted:
            if deferrable and self.test_commit_delay_s > 0:
                now = time.monotonic()
                if self._commit_due is None:
                    self._commit_due = now + self.test_commit_delay_s
                if now < self._commit_due:
                    return
            flush = getattr(self.sink, "flush", None)
            if flush is not None:
                flush()
            self._committed_seq, self._uncommitted_rows = self._next_seq, 0
            self._commits += 1
        self._commit_due = None
        self._uncommitted = False
        self._last_commit = time.monotonic()



def open_capturer(store: str, meta, writer: str, rows_per_step: int, **kwargs) -> Capturer:
    """A ``Capturer`` into writer group ``writer`` of the capture store at ``store``
    (``open_store_sink``), numbering sequences on from those the group has committed.
    ``kwargs``: the rest of ``Capturer``'s options."""
    sink = open_store_sink(store, meta, writer)
    try:
        return Capturer(sink, width=meta.row_width, rows_per_step=rows_per_step,
                        first_seq_id=sink.stats.sequences, **kwargs)
    except BaseException:
        sink.close()  # releases the writer group
        raise

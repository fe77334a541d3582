"""The capture job's feed/drain loop over a replica pool (pool.py): one pass sends a list of
prompts and returns once every one of them is in the store, failed for good, or cancelled.

Feed: a shared queue drained by ``concurrency`` workers per replica, each sending a prompt to
its replica's server (feeder.py) and keeping what the replica holds of it
(``Replica.outstanding``). Drain: every answered prompt is waited for, however late, while its
replica lives; prompts with an unknown outcome are resolved against the store once their
replica is quiet (its engine idle, then its capture plugin's status (capture/status.py) idle,
the store read up to what that status counts as committed).

A replica that dies is killed for good (its whole process group, so nothing can commit to its
writer group afterwards), the store re-read, and its outstanding prompts that the store lacks
re-queued; then it is restarted (``max_replica_restarts``).
"""
from __future__ import annotations

import asyncio
import sys
import time
from typing import Callable

from .ledger import Ledger, StoreIndex
from .pool import JobError, Pending, Replica, ReplicaPool, ReplicaState, Stats
from .prompts import Prompt
from .spec import CaptureSpec


class CaptureLoop:
    """``committed`` is called after each look at the store (the ledger has what it found);
    ``cancelled`` says whether the job was asked to stop."""

    def __init__(self, spec: CaptureSpec, pool: ReplicaPool, ledger: Ledger, index: StoreIndex,
                 prompts: dict[str, Prompt], stats: Stats, committed: Callable[[], None],
                 cancelled: Callable[[], bool]):
        self.spec = spec
        self.pool = pool
        self.ledger = ledger
        self.index = index
        self.prompts = prompts
        self.stats = stats
        self.committed = committed
        self.cancelled = cancelled
        self.attempts: dict[str, int] = {}
        self.queue: asyncio.Queue | None = None
        self.held = 0              # prompts workers have taken from the queue and not finished with
        self._fatal: BaseException | None = None
        self._tasks: set = set()

    def queue_depth(self) -> int:
        return self.queue.qsize() if self.queue is not None else 0

    # -- one pass -------------------------------------------------------------------------
    async def run(self, todo: list[Prompt]) -> None:
        from .feeder import FeedConfig
        import aiohttp

        self._fatal = None
        self.queue = asyncio.Queue()
        for p in todo:
            self.queue.put_nowait(p)
        for r in self.pool:  # a restart cancelled at the end of the previous pass
            if r.state not in (ReplicaState.UP, ReplicaState.FAILED):
                await self._recover(r)
        s = self.spec
        feed = FeedConfig(model=s.model, max_tokens=s.prompts.max_tokens, temperature=s.prompts.temperature,
                          timeout_s=s.request_timeout_s, retries=s.retries)
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as session:
            workers = [asyncio.create_task(self._worker(r, session, feed))
                       for r in self.pool for _ in range(s.concurrency)]
            monitor = asyncio.create_task(self._monitor())
            try:
                while True:
                    await self._wait_fed()
                    if await self._drain(session):
                        break
            finally:
                pending = workers + [monitor] + list(self._tasks)  # a replica restart no longer needed
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)

    # -- feeding ------------------------------------------------------------------------
    def _requeue(self, pid: str, why: str, count: bool = True) -> None:
        """Send again. Only unknown outcomes count against ``max_attempts``: a refused
        request or a dead replica ran nothing of the prompt (replica restarts are bounded)."""
        if count:
            self.attempts[pid] = self.attempts.get(pid, 0) + 1
        if self.attempts.get(pid, 0) >= self.spec.max_attempts:
            self.ledger.mark_failed(pid, f"{why} ({self.attempts[pid]} attempts)")
            self.stats.prompts_failed += 1
            return
        self.stats.prompts_requeued += 1
        self.queue.put_nowait(self.prompts[pid])

    def commit_seen(self) -> None:
        """Ledger what the store has committed since the last look."""
        fresh = [p for p in self.index.refresh() if p in self.prompts]
        self.ledger.mark_done(fresh)
        for r in self.pool:
            for p in fresh:
                r.outstanding.pop(p, None)
        self.committed()

    async def _worker(self, r: Replica, session, feed) -> None:
        from .feeder import chat

        while True:
            await r.up.wait()
            p = await self.queue.get()
            self.held += 1  # no await since the get: never neither queued nor held
            try:
                if p.prompt_id in self.ledger.done:
                    continue
                if not r.is_up:  # went down while this worker waited: another replica takes it
                    self.queue.put_nowait(p)
                    if r.state is ReplicaState.FAILED:
                        return
                    continue
                r.outstanding[p.prompt_id] = Pending.INFLIGHT
                out = await chat(session, r.url, p, feed)
                self.stats.prompts_retried += out.retries > 0
                if r.outstanding.get(p.prompt_id) is not Pending.INFLIGHT:
                    continue  # committed meanwhile, or the replica died and its recovery re-queued it
                if out.kind == "ok":
                    r.outstanding[p.prompt_id] = Pending.ANSWERED
                    r.answered += 1
                elif out.kind == "uncertain":
                    r.outstanding[p.prompt_id] = Pending.UNCERTAIN
                else:
                    r.outstanding.pop(p.prompt_id, None)
                    if out.kind == "rejected":
                        self.ledger.mark_failed(p.prompt_id, out.error)
                        self.stats.prompts_failed += 1
                    else:  # refused: nothing ran; the replica is probably dying — the monitor restarts it
                        self._requeue(p.prompt_id, out.error, count=False)
            finally:
                self.held -= 1

    async def _wait_fed(self) -> None:
        """Until the queue is empty and no worker holds a prompt (or cancelled / fatal)."""
        while True:
            if self._fatal is not None:
                raise self._fatal
            if self.cancelled():
                while not self.queue.empty():
                    self.queue.get_nowait()
            recovering = any(r.state is ReplicaState.RECOVERING for r in self.pool)
            if self.queue.empty() and self.held == 0 and not recovering:
                return
            await asyncio.sleep(0.3)

    # -- replicas that die --------------------------------------------------------------
    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.commit_seen()
            for r in self.pool:
                if not r.is_up:
                    continue
                if await self.pool.is_dead(r) and r.is_up:  # (the drain may have started its restart meanwhile)
                    self._start_recovery(r)

    def _start_recovery(self, r: Replica) -> None:
        """Take ``r`` out of service now (no worker sends to it) and recover it in the background."""
        self.pool.take_out(r)
        t = asyncio.get_running_loop().create_task(self._recover_logged(r))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _recover_logged(self, r: Replica) -> None:
        try:
            await self._recover(r)
        except Exception as e:  # noqa: BLE001 — surfaced by the capture loop
            self._fatal = e

    async def _recover(self, r: Replica) -> None:
        """A replica died: make sure nothing of it can still commit, re-queue its
        outstanding prompts the store lacks, restart it."""
        await self.pool.kill(r)
        self.commit_seen()
        lost = [p for p in r.outstanding if p not in self.ledger.done]
        r.outstanding.clear()
        for p in lost:
            self._requeue(p, "replica died", count=False)
        await self.pool.restart(r)

    # -- draining -----------------------------------------------------------------------
    async def _drain(self, session) -> bool:
        """Every outstanding prompt of a live replica settled (``_settle``); a replica that is
        down is settled by its recovery. True when nothing is left to send."""
        t0 = time.time()
        self.stats.state = "draining"
        await asyncio.gather(*(self._settle(r, session) for r in self.pool if r.outstanding and r.is_up))
        self.stats.state = "capturing"
        self.stats.add_stage("drain", t0)
        if self.cancelled():
            return True
        settled = not any(r.outstanding or r.state is ReplicaState.RECOVERING
                          for r in self.pool if r.state is not ReplicaState.FAILED)
        if not settled:
            await asyncio.sleep(0.5)
        return settled and self.queue.empty()

    async def _settle(self, r: Replica, session) -> None:
        """Until each prompt ``r`` answered or left uncertain is in the store, or ``r`` says it
        holds nothing of it. Answered prompts' rows are in the replica's capture pipeline:
        while the replica lives they are waited for, however late they commit. A prompt is
        re-queued only once the replica is quiet (``_quiet``) and the store still lacks it. A
        replica that stays busy or unreachable, writes no capture status or whose capture
        writer stops beating for ``drain_timeout_s`` is restarted: its recovery re-queues what
        the store lacks once nothing of it can commit."""
        import ray

        since = time.time()
        # Outcomes known now; prompts another replica's settling re-queues onto this one while
        # it waits are sent (inflight) and settled by the next drain.
        todo = {p for p, v in r.outstanding.items() if v is not Pending.INFLIGHT}
        while r.is_up and not self.cancelled():
            if self._fatal is not None:
                raise self._fatal
            self.commit_seen()
            todo &= r.outstanding.keys()
            if not todo:
                return
            try:
                quiet, stuck = await self._quiet(r, session, time.time() - since)
            except ray.exceptions.RayActorError:
                return  # the actor died (node lost): the monitor recovers it
            if quiet:
                for pid in todo & r.outstanding.keys():
                    state = r.outstanding.pop(pid)
                    if pid not in self.ledger.done:
                        self._requeue(pid, "answered, yet its replica's capture pipeline is empty and the store "
                                           "lacks it" if state is Pending.ANSWERED else "no answer, and its replica "
                                           "holds nothing of it")
                return
            if stuck and r.is_up:
                print(f"requant: replica {r.index} {stuck}; restarting it", file=sys.stderr)
                self._start_recovery(r)
                return
            await asyncio.sleep(0.5)

    async def _quiet(self, r: Replica, session, waited: float) -> tuple[bool, str]:
        """(quiet, why stuck or ""). Quiet: the engine runs and queues no request, *then* the
        capture status says every pipeline is idle, and the store as read here holds every
        sequence that status counts as committed — nothing the replica has run can still reach
        the store. Read in that order: a request's rows enter the pipeline (shown busy) in the
        forward that computes them, before the engine can report the request done."""
        from .feeder import running_requests

        late = waited > self.spec.drain_timeout_s
        n = await running_requests(session, r.url)
        if n is None:
            return False, f"has not answered /metrics for {waited:.0f} s" if late else ""
        if n:
            return False, f"still runs {n} requests {waited:.0f} s into the drain" if late else ""
        st = await r.actor.capture_status.remote()
        r.capture = st
        self.pool.changed()
        if st is None:
            return False, f"has written no capture status in {waited:.0f} s" if late else ""
        failed = [f"{name}: {p['error']}" for name, p in st["points"].items() if p.get("error")]
        if failed:
            return False, f"capture failed ({'; '.join(failed)})"
        if st["age_s"] > self.spec.drain_timeout_s:
            return False, f"capture writer has not beaten for {st['age_s']:.0f} s"
        if not st["idle"]:
            return False, ""
        point = st["points"].get(self.spec.point)
        if point is None:
            raise JobError(f"replica {r.index}: its capture status has no point {self.spec.point!r} "
                           f"(points: {sorted(st['points'])})")
        self.commit_seen()
        return self.index.seen.get(self.pool.writer(r), 0) >= point["committed_sequences"], ""

"""The Ray capture job: replicas up, prompts fed, every prompt in the store exactly once.

    result = run_capture(spec)              # CaptureSpec (spec.py)

Flow: connect to Ray ($RAY_ADDRESS / ``ray_address``) or start a local one → reconcile the
ledger with the store (ledger.py) → start ``replicas`` vLLM servers as Ray actors
(replica.py), wait until healthy → feed the prompts not yet in the store (feeder.py), a
shared queue drained by ``concurrency`` workers per replica → drain (every answered prompt
committed — waited for, however late, while its replica lives; prompts with an unknown
outcome resolved against the store once their replica is quiet: its engine idle, then its
capture plugin's status (capture/status.py) idle, the store read up to what that status
counts as committed) → coverage loop → stop the servers (SIGINT: the plugin closes the store
cleanly).

A replica that dies is stopped for good (its whole process group, so nothing can commit
to its writer group afterwards), the store re-read, and its outstanding prompts that the
store lacks re-queued; then it is restarted (``max_replica_restarts``).
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .ledger import Ledger, StoreIndex, ledger_path, wait_writers_idle
from .prompts import Prompt, load_prompts
from .spec import CaptureSpec


class JobError(RuntimeError):
    pass


@dataclass
class Stats:
    prompts_total: int = 0
    prompts_done: int = 0          # in the store (this run + earlier runs)
    prompts_skipped: int = 0       # already in the store at start
    prompts_failed: int = 0
    prompts_retried: int = 0
    prompts_requeued: int = 0
    queue_depth: int = 0
    rows: int = 0
    bytes: int = 0
    replicas_healthy: int = 0
    replica_restarts: int = 0
    duplicates: int = 0
    enforce_eager: bool = False    # replicas (now) start with --enforce-eager
    eager_reason: str = ""         # auto: the plugin's refusal that switched to eager
    stage_seconds: dict = field(default_factory=dict)
    coverage: dict = field(default_factory=dict)
    state: str = "starting"
    started: float = field(default_factory=time.time)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        el = time.time() - self.started
        d["elapsed_s"] = el
        d["rows_per_s"] = self.rows / el if el > 0 else 0.0
        return d


@dataclass
class _Replica:
    index: int
    actor: object = None
    url: str = ""
    pid: int = 0
    up: asyncio.Event = field(default_factory=asyncio.Event)
    incarnation: int = 0
    eager: bool = False                               # its server runs with --enforce-eager
    restarts: int = 0
    outstanding: dict = field(default_factory=dict)   # prompt id → "inflight" | "ok" | "uncertain"
    failed: bool = False
    recovering: bool = False
    answered: int = 0                                 # 200 responses (all incarnations)
    capture: dict | None = None                       # its capture status as the drain last read it


def init_ray(address: str | None, replicas: int, replica_cpus: float) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "auto":
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            cpus = max(os.cpu_count() or 1, int(replicas * replica_cpus + 0.999))
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise JobError(f"cannot connect to the Ray cluster at {address!r}: {e}") from None


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds on an unreachable cluster (ray.init retries for minutes)."""
    import socket

    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise JobError(f"Ray address {address!r}: expected host:port (or ray://host:port)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise JobError(f"cannot reach the Ray cluster at {address!r}: {e}") from None


class CaptureJob:
    def __init__(self, spec: CaptureSpec, progress: bool = True, status_file: str | None = None):
        self.spec = spec
        self.progress = progress
        self.status_file = status_file
        self.stats = Stats(enforce_eager=spec.starts_eager())
        self.index = StoreIndex(spec.store)
        self.ledger: Ledger | None = None
        self.replicas: list[_Replica] = []
        self.attempts: dict[str, int] = {}
        self.queue: asyncio.Queue | None = None
        self._held = 0             # prompts workers have taken from the queue and not finished with
        self.prompts: dict[str, Prompt] = {}
        self._bar = None
        self._cancel = False
        self._fatal: BaseException | None = None
        self._tasks: set = set()
        self.run_tag = time.strftime("%Y%m%dT%H%M%S")

    # -- public -------------------------------------------------------------------------
    def plan(self) -> dict:
        """What the job would do (``--dry-run``): no Ray, no servers."""
        prompts = load_prompts(self._prompt_config())
        ledger = Ledger(self.spec.ledger or ledger_path(self.spec.store))
        try:
            ledger.reconcile(self.index)
        finally:
            ledger.close()
        todo = [p for p in prompts if p.prompt_id not in ledger.done]
        return {"model": self.spec.model, "store": self.spec.store, "replicas": self.spec.replicas,
                "tensor_parallel": self.spec.tensor_parallel, "prompts": len(prompts),
                "already_captured": len(prompts) - len(todo), "to_send": len(todo),
                "max_tokens": self.spec.prompts.max_tokens, "ledger": str(ledger.path),
                "enforce_eager": str(self.spec.enforce_eager) + (
                    f" (starts {'eager' if self.stats.enforce_eager else 'compiled'})"
                    if self.spec.enforce_eager == "auto" else ""),
                "coverage": self.spec.coverage.model_dump() if self.spec.coverage else None,
                "ray": self.spec.ray_address or os.environ.get("RAY_ADDRESS") or "local"}

    def run(self) -> dict:
        try:
            return asyncio.run(self._run())
        finally:
            if self._bar is not None:
                self._bar.close()

    def cancel(self) -> None:
        self._cancel = True

    # -- setup --------------------------------------------------------------------------
    def _prompt_config(self):
        cfg = self.spec.prompts.config()
        cov = self.spec.coverage
        if cov is not None:  # the coverage loop draws more prompts from the same sampled order
            from dataclasses import replace
            cfg = replace(cfg, count=cov.max_prompts)
        return cfg

    def _stage(self, name: str, t0: float) -> None:
        self.stats.stage_seconds[name] = self.stats.stage_seconds.get(name, 0.0) + time.time() - t0

    async def _run(self) -> dict:
        spec = self.spec
        t0 = time.time()
        prompts = load_prompts(self._prompt_config())
        self.prompts = {p.prompt_id: p for p in prompts}
        self.ledger = Ledger(spec.ledger or ledger_path(spec.store))
        if "://" not in spec.store:
            try:
                await asyncio.to_thread(wait_writers_idle, spec.store, spec.drain_timeout_s)
            except RuntimeError as e:
                raise JobError(str(e)) from None
        recon = self.ledger.reconcile(self.index)
        _report_reconcile(self.ledger.path, recon)
        done_at_start = {p.prompt_id for p in prompts} & self.ledger.done
        self.stats.prompts_total = len(prompts) if spec.coverage is None else (spec.prompts.count or len(prompts))
        self.stats.prompts_skipped = len(done_at_start)
        self._stage("prompts", t0)
        self._write_status(reconcile=recon)
        first = spec.prompts.count if spec.coverage is not None and spec.prompts.count else len(prompts)
        todo = [p for p in prompts[:first] if p.prompt_id not in self.ledger.done]
        if not todo and spec.coverage is None:  # a rerun of a finished job: nothing to start
            return self._finish()
        try:
            cursor = first
            await self._capture(todo)
            if spec.coverage is not None:
                while True:
                    t0 = time.time()
                    counts = await asyncio.to_thread(self._route_counts)
                    self._stage("coverage_replay", t0)
                    low = int(counts.min())
                    self.stats.coverage = {"min_tokens_per_expert": low, "target": spec.coverage.min_tokens_per_expert,
                                           "tokens_per_expert": counts.tolist(), "prompts_used": cursor}
                    self._write_status()
                    if low >= spec.coverage.min_tokens_per_expert or cursor >= len(prompts):
                        break
                    step = spec.prompts.count or 16
                    more = [p for p in prompts[cursor:cursor + step] if p.prompt_id not in self.ledger.done]
                    cursor += step
                    self.stats.prompts_total = min(cursor, len(prompts))
                    await self._capture(more)
                self.stats.coverage["reached"] = self.stats.coverage["min_tokens_per_expert"] >= \
                    spec.coverage.min_tokens_per_expert
        finally:
            if self.replicas:
                t0 = time.time()
                self.stats.state = "stopping"
                await self._stop_all()
                self._stage("shutdown", t0)
        return self._finish()

    async def _start_replicas(self) -> None:
        """Ray and the servers, on first need (a rerun with nothing to send starts neither)."""
        spec = self.spec
        t0 = time.time()
        init_ray(spec.ray_address, spec.replicas, spec.replica_cpus)
        self._stage("ray", t0)
        t0 = time.time()
        self.stats.state = "starting replicas"
        self.replicas = [_Replica(i) for i in range(spec.replicas)]
        await asyncio.gather(*(self._start(r) for r in self.replicas))
        self._stage("replicas_start", t0)
        self.stats.state = "capturing"
        self._write_status()

    def _finish(self) -> dict:
        spec = self.spec
        self.index.refresh()
        self.ledger.mark_done([p for p in self.index.counts if p in self.prompts])
        self._refresh_counts()
        dup = self.index.duplicates()
        self.stats.duplicates = len(dup)
        self.stats.state = "cancelled" if self._cancel else "done"
        self._write_status()
        self.ledger.close()
        return {**self.stats.as_dict(), "store": spec.store, "ledger": str(self.ledger.path),
                "answered_per_replica": [r.answered for r in self.replicas],
                "duplicates_ids": sorted(dup)[:10]}

    # -- replicas -----------------------------------------------------------------------
    def _actor_cls(self):
        from .replica import replica_actor

        gpus = self.spec.replica_gpus
        if gpus is None:
            import ray
            gpus = float(self.spec.tensor_parallel) if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        return replica_actor(self.spec.replica_cpus, gpus)

    def _replica_spec(self, r: _Replica):
        from .replica import ReplicaSpec

        s = self.spec
        log_dir = str(Path(s.store.rstrip("/")).with_name(Path(s.store.rstrip("/")).name + ".logs")) \
            if "://" not in s.store else ""
        # One writer group per replica and job run: a server of a killed earlier run may still
        # hold its group while it shuts down.
        return ReplicaSpec(model=s.model, store=s.store, writer=self._writer(r), replica=r.index,
                           tensor_parallel=s.tensor_parallel, max_model_len=s.max_model_len, point=s.point,
                           enforce_eager=self.stats.enforce_eager,
                           extra_args=tuple(s.vllm_args), env=dict(s.env), log_dir=log_dir,
                           driver_ip=self._driver_ip())

    def _writer(self, r: _Replica) -> str:
        return f"replica{r.index}-{self.run_tag}"

    @staticmethod
    def _driver_ip() -> str:
        import ray.util
        return ray.util.get_node_ip_address()

    async def _start(self, r: _Replica) -> None:
        if r.actor is None:
            spec = self._replica_spec(r)
            r.actor, r.eager = self._actor_cls().remote(spec), spec.enforce_eager
        info = await r.actor.start.remote()
        r.url, r.pid = info["url"], info["pid"]
        r.incarnation += 1
        deadline = time.time() + self.spec.health_timeout_s
        while True:
            st = await r.actor.status.remote()
            if st["healthy"]:
                break
            if not st["alive"]:
                refusal = await r.actor.refusal.remote()
                if refusal and self.spec.enforce_eager == "auto" and not r.eager:
                    await self._restart_eager(r, refusal["error"])
                    return
                if refusal:
                    raise JobError(f"replica {r.index}: {refusal['error']} (enforce_eager is "
                                   f"{self.spec.enforce_eager}; auto or true lets the job start it eager)")
                tail = await r.actor.log_tail.remote()
                raise JobError(f"replica {r.index} exited with code {st['exit']} before becoming healthy; "
                               f"log tail:\n{tail}")
            if time.time() > deadline:
                await r.actor.stop.remote(10)
                raise JobError(f"replica {r.index} did not become healthy within {self.spec.health_timeout_s:.0f} s "
                               f"(log: {info['log']})")
            await asyncio.sleep(1.0)
        r.up.set()
        self.stats.replicas_healthy = sum(x.up.is_set() for x in self.replicas)
        self._write_status()

    async def _restart_eager(self, r: _Replica, why: str) -> None:
        """auto: the plugin refused the point on the model tree this replica built with
        compilation on; this replica and every later start run eager."""
        import ray

        self.stats.enforce_eager, self.stats.eager_reason = True, why
        ray.kill(r.actor)
        r.actor = None
        await self._start(r)

    async def _stop_all(self) -> None:
        import ray

        async def stop(r: _Replica):
            if r.actor is None:
                return
            try:
                await r.actor.stop.remote(60)
                await r.actor.wait_gone.remote(30)
            except ray.exceptions.RayActorError:
                pass
            ray.kill(r.actor)
            r.up.clear()
        await asyncio.gather(*(stop(r) for r in self.replicas))
        self.stats.replicas_healthy = 0

    async def _recover(self, r: _Replica) -> None:
        """A replica died: make sure nothing of it can still commit, re-queue its
        outstanding prompts the store lacks, restart it."""
        import ray

        r.up.clear()
        r.recovering = True
        self.stats.replicas_healthy = sum(x.up.is_set() for x in self.replicas)
        try:
            await r.actor.kill.remote()
            await r.actor.wait_gone.remote(60)
        except ray.exceptions.RayActorError:  # the actor itself died (node lost): its processes with it
            r.actor = None
        self._commit_seen()
        lost = [p for p in r.outstanding if p not in self.ledger.done]
        r.outstanding.clear()
        for p in lost:
            self._requeue(p, "replica died", count=False)
        r.recovering = False
        if r.restarts >= self.spec.max_replica_restarts:
            r.failed = True
            if all(x.failed for x in self.replicas):
                raise JobError(f"every replica failed (restarted {self.spec.max_replica_restarts} times each)")
            return
        r.restarts += 1
        self.stats.replica_restarts += 1
        await self._start(r)

    async def _monitor(self) -> None:
        import ray

        while True:
            await asyncio.sleep(1.0)
            self._commit_seen()
            for r in self.replicas:
                if not r.up.is_set() or r.failed:
                    continue
                try:
                    st = await r.actor.status.remote()
                    dead = not st["alive"]
                except ray.exceptions.RayActorError:
                    dead = True
                if dead and r.up.is_set():  # (the drain may have started its restart meanwhile)
                    self._start_recovery(r)

    def _start_recovery(self, r: _Replica) -> None:
        """Take ``r`` out of service now (no worker sends to it) and recover it in the background."""
        r.up.clear()
        r.recovering = True
        t = asyncio.get_running_loop().create_task(self._recover_logged(r))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _recover_logged(self, r: _Replica) -> None:
        try:
            await self._recover(r)
        except Exception as e:  # noqa: BLE001 — surfaced by the capture loop
            self._fatal = e

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

    def _commit_seen(self) -> None:
        """Ledger what the store has committed since the last look."""
        fresh = [p for p in self.index.refresh() if p in self.prompts]
        self.ledger.mark_done(fresh)
        for r in self.replicas:
            for p in fresh:
                r.outstanding.pop(p, None)
        self._refresh_counts()

    def _refresh_counts(self) -> None:
        done = sum(1 for p in self.prompts if p in self.ledger.done)
        if self._bar is not None:
            self._bar.update(done - self._bar.n)
        self.stats.prompts_done = done
        self.stats.rows = self.index.total_rows
        self.stats.bytes = self.stats.rows * 2 * self._row_width()
        self.stats.queue_depth = self.queue.qsize() if self.queue is not None else 0
        self._write_status()

    def _row_width(self) -> int:
        if not hasattr(self, "_width"):
            try:
                from requant.storage import CaptureStore
                self._width = CaptureStore.open(self.spec.store).meta.row_width
            except Exception:  # noqa: BLE001 — not created yet
                return 0
        return self._width

    async def _worker(self, r: _Replica, session, feed) -> None:
        from .feeder import chat

        while True:
            await r.up.wait()
            p = await self.queue.get()
            self._held += 1  # no await since the get: never neither queued nor held
            try:
                if p.prompt_id in self.ledger.done:
                    continue
                if r.failed or not r.up.is_set():  # went down while this worker waited: another replica takes it
                    self.queue.put_nowait(p)
                    if r.failed:
                        return
                    continue
                r.outstanding[p.prompt_id] = "inflight"
                out = await chat(session, r.url, p, feed)
                self.stats.prompts_retried += out.retries > 0
                if r.outstanding.get(p.prompt_id) != "inflight":
                    continue  # committed meanwhile, or the replica died and its recovery re-queued it
                if out.kind == "ok":
                    r.outstanding[p.prompt_id] = "ok"
                    r.answered += 1
                elif out.kind == "uncertain":
                    r.outstanding[p.prompt_id] = "uncertain"
                else:
                    r.outstanding.pop(p.prompt_id, None)
                    if out.kind == "rejected":
                        self.ledger.mark_failed(p.prompt_id, out.error)
                        self.stats.prompts_failed += 1
                    else:  # refused: nothing ran; the replica is probably dying — the monitor restarts it
                        self._requeue(p.prompt_id, out.error, count=False)
            finally:
                self._held -= 1

    async def _capture(self, todo: list[Prompt]) -> None:
        from .feeder import FeedConfig
        import aiohttp

        if not todo:
            return
        if not self.replicas:
            await self._start_replicas()
        t0 = time.time()
        self._fatal = None
        if self.progress and self._bar is None:
            from tqdm import tqdm
            self._bar = tqdm(total=self.stats.prompts_total, desc="prompts captured", unit="prompt",
                             initial=self.stats.prompts_skipped, file=sys.stderr)
        elif self._bar is not None:
            self._bar.total = self.stats.prompts_total
        self.queue = asyncio.Queue()
        for p in todo:
            self.queue.put_nowait(p)
        for r in self.replicas:  # a restart cancelled at the end of the previous pass
            if not r.up.is_set() and not r.failed:
                await self._recover(r)
        s = self.spec
        feed = FeedConfig(model=s.model, max_tokens=s.prompts.max_tokens, temperature=s.prompts.temperature,
                          timeout_s=s.request_timeout_s, retries=s.retries)
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as session:
            workers = [asyncio.create_task(self._worker(r, session, feed))
                       for r in self.replicas for _ in range(s.concurrency)]
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
        self._stage("capture", t0)

    async def _wait_fed(self) -> None:
        """Until the queue is empty and no worker holds a prompt (or cancelled / fatal)."""
        while True:
            if self._fatal is not None:
                raise self._fatal
            if self._cancel:
                while not self.queue.empty():
                    self.queue.get_nowait()
            recovering = any(r.recovering for r in self.replicas)
            if self.queue.empty() and self._held == 0 and not recovering:
                return
            await asyncio.sleep(0.3)

    async def _drain(self, session) -> bool:
        """Every outstanding prompt of a live replica settled (``_settle``); a replica that is
        down is settled by its recovery. True when nothing is left to send."""
        t0 = time.time()
        self.stats.state = "draining"
        await asyncio.gather(*(self._settle(r, session) for r in self.replicas if r.outstanding and r.up.is_set()))
        self.stats.state = "capturing"
        self._stage("drain", t0)
        if self._cancel:
            return True
        settled = not any(r.outstanding or r.recovering for r in self.replicas if not r.failed)
        if not settled:
            await asyncio.sleep(0.5)
        return settled and self.queue.empty()

    async def _settle(self, r: _Replica, session) -> None:
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
        todo = {p for p, v in r.outstanding.items() if v != "inflight"}
        while r.up.is_set() and not self._cancel:
            if self._fatal is not None:
                raise self._fatal
            self._commit_seen()
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
                                           "lacks it" if state == "ok" else "no answer, and its replica holds "
                                           "nothing of it")
                return
            if stuck and r.up.is_set():
                print(f"requant: replica {r.index} {stuck}; restarting it", file=sys.stderr)
                self._start_recovery(r)
                return
            await asyncio.sleep(0.5)

    async def _quiet(self, r: _Replica, session, waited: float) -> tuple[bool, str]:
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
        self._write_status()
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
        self._commit_seen()
        return self.index.seen.get(self._writer(r), 0) >= point["committed_sequences"], ""

    def _route_counts(self):
        from requant.quantizer.mtp.arch import load_block
        from requant.quantizer.stage.replay import ReplayConfig, route_counts

        master = self.spec.coverage.master or self.spec.model
        block = load_block(master)
        return route_counts(block, [self.spec.store], ReplayConfig())

    # -- status -------------------------------------------------------------------------
    def _write_status(self, **extra) -> None:
        if not self.status_file:
            return
        d = {**self.stats.as_dict(), **extra,
             "replicas": [{"index": r.index, "url": r.url, "pid": r.pid, "up": r.up.is_set(),
                           "restarts": r.restarts, "outstanding": len(r.outstanding), "answered": r.answered,
                           "capture": r.capture}
                          for r in self.replicas]}
        tmp = self.status_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(d, f)
        os.replace(tmp, self.status_file)


def _report_reconcile(path: Path, recon: dict) -> None:
    """Say what the start-up reconcile repaired (the store is the truth; the ledger follows it)."""
    fixed = [f"{n} {what}" for what, n in (("damaged lines dropped", recon["damaged_lines_dropped"]),
                                           ("prompts ledgered but not in the store (to capture again)",
                                            recon["ledgered_not_in_store"])) if n]
    if fixed:
        print(f"requant: ledger {path} repaired from the store: {'; '.join(fixed)}", file=sys.stderr)


def run_capture(spec: CaptureSpec, progress: bool = True, status_file: str | None = None) -> dict:
    return CaptureJob(spec, progress=progress, status_file=status_file).run()

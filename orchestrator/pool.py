"""The capture job's replica pool: one vLLM server per replica, each owned by a Ray actor
(replica.py), started, health-checked, restarted and stopped here.

A replica is in one ``ReplicaState`` at a time. Only an ``UP`` replica is sent prompts; its
``up`` event is set exactly while it is ``UP``, so the capture loop's workers wait on it.
"""
from __future__ import annotations

import asyncio
import enum
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .spec import CaptureSpec


class JobError(RuntimeError):
    pass


class ReplicaState(enum.Enum):
    STARTING = "starting"        # its server starting (first start, or a restart after recovery)
    UP = "up"                    # healthy: workers send to it
    RECOVERING = "recovering"    # died: being killed for good, its outstanding prompts re-queued
    FAILED = "failed"            # out of restarts: never used again
    STOPPED = "stopped"          # shut down at the end of the job


class Pending(enum.Enum):
    """What a replica holds of a prompt it was sent (until the store has it)."""
    INFLIGHT = "inflight"        # sent, no answer yet
    ANSWERED = "ok"              # 200: its rows are in the replica's capture pipeline
    UNCERTAIN = "uncertain"      # the replica may have run part of it


@dataclass
class Replica:
    index: int
    actor: object = None
    url: str = ""
    pid: int = 0
    incarnation: int = 0
    eager: bool = False                                   # its server runs with --enforce-eager
    restarts: int = 0
    outstanding: dict[str, Pending] = field(default_factory=dict)   # prompt id → what it holds of it
    answered: int = 0                                     # 200 responses (all incarnations)
    capture: dict | None = None                           # its capture status as the drain last read it
    up: asyncio.Event = field(default_factory=asyncio.Event)
    _state: ReplicaState = ReplicaState.STARTING

    @property
    def state(self) -> ReplicaState:
        return self._state

    @state.setter
    def state(self, s: ReplicaState) -> None:
        self._state = s
        if s is ReplicaState.UP:
            self.up.set()
        else:
            self.up.clear()

    @property
    def is_up(self) -> bool:
        return self._state is ReplicaState.UP


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

    def add_stage(self, name: str, t0: float) -> None:
        self.stage_seconds[name] = self.stage_seconds.get(name, 0.0) + time.time() - t0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        el = time.time() - self.started
        d["elapsed_s"] = el
        d["rows_per_s"] = self.rows / el if el > 0 else 0.0
        return d


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


class ReplicaPool:
    """``spec.replicas`` replicas of one job run. ``changed`` is called whenever what the
    status file shows of them changes."""

    def __init__(self, spec: CaptureSpec, stats: Stats, run_tag: str, changed: Callable[[], None] = lambda: None):
        self.spec = spec
        self.stats = stats
        self.run_tag = run_tag
        self.changed = changed
        self.replicas: list[Replica] = []

    def __iter__(self):
        return iter(self.replicas)

    def __bool__(self) -> bool:
        return bool(self.replicas)

    def writer(self, r: Replica) -> str:
        """Its writer group: one per replica and job run (a server of a killed earlier run may
        still hold its group while it shuts down)."""
        return f"replica{r.index}-{self.run_tag}"

    def _count_healthy(self) -> None:
        self.stats.replicas_healthy = sum(r.is_up for r in self.replicas)

    async def start_all(self) -> None:
        """Ray and the servers (on first need: a rerun with nothing to send starts neither)."""
        spec = self.spec
        t0 = time.time()
        init_ray(spec.ray_address, spec.replicas, spec.replica_cpus)
        self.stats.add_stage("ray", t0)
        t0 = time.time()
        self.stats.state = "starting replicas"
        self.replicas = [Replica(i) for i in range(spec.replicas)]
        await asyncio.gather(*(self.start(r) for r in self.replicas))
        self.stats.add_stage("replicas_start", t0)
        self.stats.state = "capturing"
        self.changed()

    def actor_cls(self):
        from .replica import replica_actor

        gpus = self.spec.replica_gpus
        if gpus is None:
            import ray
            gpus = float(self.spec.tensor_parallel) if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        return replica_actor(self.spec.replica_cpus, gpus)

    def replica_spec(self, r: Replica):
        from .replica import ReplicaSpec

        s = self.spec
        log_dir = str(Path(s.store.rstrip("/")).with_name(Path(s.store.rstrip("/")).name + ".logs")) \
            if "://" not in s.store else ""
        return ReplicaSpec(model=s.model, store=s.store, writer=self.writer(r), replica=r.index,
                           tensor_parallel=s.tensor_parallel, max_model_len=s.max_model_len, point=s.point,
                           enforce_eager=self.stats.enforce_eager,
                           extra_args=tuple(s.vllm_args), env=dict(s.env), log_dir=log_dir,
                           driver_ip=_driver_ip())

    async def start(self, r: Replica) -> None:
        """Start ``r``'s server (a new actor if it has none) and wait until it is healthy."""
        if r.actor is None:
            spec = self.replica_spec(r)
            r.actor, r.eager = self.actor_cls().remote(spec), spec.enforce_eager
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
        r.state = ReplicaState.UP
        self._count_healthy()
        self.changed()

    async def _restart_eager(self, r: Replica, why: str) -> None:
        """auto: the plugin refused the point on the model tree this replica built with
        compilation on; this replica and every later start run eager."""
        import ray

        self.stats.enforce_eager, self.stats.eager_reason = True, why
        ray.kill(r.actor)
        r.actor = None
        await self.start(r)

    def take_out(self, r: Replica) -> None:
        """Out of service now (no worker sends to it): it died or is stuck."""
        r.state = ReplicaState.RECOVERING
        self._count_healthy()

    async def kill(self, r: Replica) -> None:
        """Kill its whole server and wait until no process of it is left, so nothing of it can
        still commit to its writer group."""
        import ray

        self.take_out(r)
        try:
            await r.actor.kill.remote()
            await r.actor.wait_gone.remote(60)
        except ray.exceptions.RayActorError:  # the actor itself died (node lost): its processes with it
            r.actor = None

    async def restart(self, r: Replica) -> None:
        """After ``kill``: start it again, or mark it failed once out of restarts."""
        if r.restarts >= self.spec.max_replica_restarts:
            r.state = ReplicaState.FAILED
            if all(x.state is ReplicaState.FAILED for x in self.replicas):
                raise JobError(f"every replica failed (restarted {self.spec.max_replica_restarts} times each)")
            return
        r.state = ReplicaState.STARTING
        r.restarts += 1
        self.stats.replica_restarts += 1
        await self.start(r)

    async def is_dead(self, r: Replica) -> bool:
        import ray

        try:
            return not (await r.actor.status.remote())["alive"]
        except ray.exceptions.RayActorError:
            return True

    async def stop_all(self) -> None:
        import ray

        async def stop(r: Replica):
            if r.actor is None:
                return
            try:
                await r.actor.stop.remote(60)
                await r.actor.wait_gone.remote(30)
            except ray.exceptions.RayActorError:
                pass
            ray.kill(r.actor)
            r.state = ReplicaState.STOPPED
        await asyncio.gather(*(stop(r) for r in self.replicas))
        self.stats.replicas_healthy = 0


def _driver_ip() -> str:
    import ray.util
    return ray.util.get_node_ip_address()

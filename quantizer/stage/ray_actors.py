"""Run a stage's workers as Ray actors, one per rank, on the cluster at ``RAY_ADDRESS`` or a
local one: one GPU each where the cluster has GPUs, else a share of its CPUs; an actor that
dies is a lost worker (Ray does not restart it: the driver replaces it)."""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Callable

import torch

from requant.quantizer.stage.distribute import StageTask
from requant.quantizer.stage.driver import Pool, drive
from requant.quantizer.stage.records import ClusterFacts, RunOutcome, WorkerResult
from requant.quantizer.stage.wire import FlatTensors, flatten, unflatten
from requant.quantizer.stage.worker import Worker


class _RayWorker(Worker):
    """The Ray actor: results leave as numpy (the object store takes it without a pickled copy)."""

    def quantize(self, pooled: tuple[torch.Tensor, torch.Tensor] | None = None) -> WorkerResult:
        res = super().quantize(pooled)
        flat = flatten(res.tensors)
        flat.data = flat.data.numpy()
        res.tensors = flat
        return res


class _RayPool(Pool):
    """One Ray actor per rank (``max_restarts=0``: an actor Ray restarted would come back
    empty, so the driver replaces lost ones itself)."""

    def __init__(self, task: StageTask, opts: dict):
        import ray

        self.ray, self.task = ray, task
        self.cls = ray.remote(max_restarts=0, max_task_retries=0, **opts)(_RayWorker)
        self.actors: dict[int, object] = {}
        for r in range(task.world):
            self.restart(r)

    def restart(self, r: int) -> None:
        if r in self.actors:
            self.ray.kill(self.actors[r], no_restart=True)
        self.actors[r] = self.cls.remote(self.task, r)

    def run(self, calls: dict, collective: bool = False) -> tuple[dict, list[int]]:
        ray = self.ray
        refs = {getattr(self.actors[r], m).remote(*a): r for r, (m, *a) in calls.items()}
        done, lost = {}, []
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            r = refs.pop(ready[0])
            try:
                res = ray.get(ready[0])
            except ray.exceptions.RayActorError:
                lost.append(r)
                if collective:  # the others may wait for it inside the collective
                    return done, lost
                continue
            except ray.exceptions.RayTaskError as e:  # an input error inside a worker: raise it as such
                cause = getattr(e, "cause", None)
                raise (cause if isinstance(cause, Exception) else e) from None
            if isinstance(res, WorkerResult):  # out of the (read-only) object store into our memory
                res.tensors = unflatten(FlatTensors(res.tensors.meta, torch.from_numpy(res.tensors.data.copy())))
            done[r] = res
        return done, lost

    def close(self) -> None:
        for a in self.actors.values():
            self.ray.kill(a, no_restart=True)


def run_ray(task: StageTask, max_retries: int = 2, progress: Callable[[str, int], None] | None = None) -> RunOutcome:
    """One Ray actor per worker on the cluster at ``RAY_ADDRESS`` (else a local one started
    here and shut down after)."""
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True)
        started = True
    try:
        res = ray.cluster_resources()
        gpus, cpus = res.get("GPU", 0), res.get("CPU", 1)
        if gpus >= 1:  # the actor sees its one GPU as cuda:0 (Ray sets CUDA_VISIBLE_DEVICES)
            if task.world > gpus:
                raise ValueError(f"{task.world} workers need {task.world} GPUs at once (they reduce together); "
                                 f"the Ray cluster has {gpus:g}")
            opts = {"num_gpus": 1}
            task = replace(task, device="cuda")
        else:  # all actors must be up at once: share the CPUs rather than queue
            opts = {"num_cpus": min(1.0, cpus / task.world)}
        pool = _RayPool(task, opts)
        try:
            out = drive(pool, task, max_retries, progress)
        finally:
            pool.close()
        out.cluster = ClusterFacts(ray.__version__, gpus, os.environ.get("RAY_ADDRESS") or "local")
        return out
    finally:
        if started:
            ray.shutdown()

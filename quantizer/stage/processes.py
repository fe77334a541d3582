"""Run a stage's workers as spawned processes on this host (no Ray): one per rank, worker r
alone on GPU r % gpus when there are GPUs; commands over a queue per process, answers back
through torch's shared-memory queue; a process that dies is a lost worker."""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Callable

import torch

from requant.quantizer.stage.distribute import StageTask
from requant.quantizer.stage.driver import Pool, drive
from requant.quantizer.stage.records import RunOutcome, WorkerResult
from requant.quantizer.stage.wire import flatten, unflatten
from requant.quantizer.stage.worker import Worker


class _ProcessPool(Pool):
    """One spawned process per rank (GPU r % gpus each when ``gpus``), commands over a queue,
    results back through torch's shared-memory queue."""

    def __init__(self, task: StageTask, gpus: int):
        import torch.multiprocessing as mp

        self.task, self.gpus = task, gpus
        self.ctx = mp.get_context("spawn")
        self.results = self.ctx.Queue()
        self.procs: dict[int, tuple] = {}
        self.seq = 0
        for r in range(task.world):
            self.restart(r)

    def restart(self, r: int) -> None:
        old = self.procs.get(r)
        if old is not None:
            old[0].kill()
            old[0].join(timeout=30)
        task = replace(self.task, device="cuda") if self.gpus else self.task
        cmds = self.ctx.Queue()
        p = self.ctx.Process(target=_process_main, args=(task, r, str(r % self.gpus) if self.gpus else None, cmds,
                                                         self.results), daemon=True)
        p.start()
        self.procs[r] = (p, cmds)

    def run(self, calls: dict, collective: bool = False) -> tuple[dict, list[int]]:
        import queue as queue_mod

        pending = {}
        for r, (method, *args) in calls.items():
            self.seq += 1
            pending[self.seq] = r
            self.procs[r][1].put((self.seq, method, args))
        done, lost = {}, []
        while pending:
            try:
                r, seq, res, err = self.results.get(timeout=1)
            except queue_mod.Empty:
                for seq, r in list(pending.items()):
                    if not self.procs[r][0].is_alive():
                        pending.pop(seq)
                        lost.append(r)
                        if collective:  # the others may wait for it inside the collective
                            return done, lost
                continue
            if seq not in pending:
                continue  # an answer from a process since replaced
            pending.pop(seq)
            if err is not None:
                raise err
            if isinstance(res, WorkerResult):
                res.tensors = unflatten(res.tensors)
            done[r] = res
        return done, lost

    def close(self) -> None:
        for p, cmds in self.procs.values():
            if p.is_alive():
                cmds.put(None)
        for p, _ in self.procs.values():
            p.join(timeout=60)
            if p.is_alive():
                p.kill()


def _process_main(task: StageTask, rank: int, visible: str | None, cmds, results) -> None:
    if visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible  # before CUDA initialises in this process
    worker = Worker(task, rank)
    while True:
        cmd = cmds.get()
        if cmd is None:
            return
        seq, method, args = cmd
        try:
            res = getattr(worker, method)(*args)
            if isinstance(res, WorkerResult):
                res.tensors = flatten(res.tensors)  # one shared-memory buffer, not thousands of fds
            results.put((rank, seq, res, None))
        except Exception as e:  # an input error: hand it to the parent as such
            results.put((rank, seq, None, e))


def run_processes(task: StageTask, gpus: int = 0, max_retries: int = 2,
                  progress: Callable[[str, int], None] | None = None) -> RunOutcome:
    """One spawned process per worker (no Ray: one host, or where Ray cannot be installed);
    with ``gpus`` ≥ 1, worker r runs alone on GPU r % gpus (CUDA_VISIBLE_DEVICES)."""
    if torch.distributed.is_available() is False:
        raise RuntimeError("torch.distributed is not available in this torch build")
    pool = _ProcessPool(task, gpus)
    try:
        return drive(pool, task, max_retries, progress)
    finally:
        pool.close()

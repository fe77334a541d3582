"""Run a stage's one worker in this process."""
from __future__ import annotations

from typing import Callable

import torch

from requant.quantizer.stage.distribute import StageTask
from requant.quantizer.stage.driver import Pool, drive
from requant.quantizer.stage.records import RunOutcome
from requant.quantizer.stage.worker import Worker


class _LocalPool(Pool):
    """One worker in this process (its losses are this process's)."""

    def __init__(self, task: StageTask):
        self.task = task
        self.workers = {0: Worker(task, 0)}

    def restart(self, r: int) -> None:
        self.workers[r] = Worker(self.task, r)

    def call(self, r: int, method: str, *args):
        return getattr(self.workers[r], method)(*args)

    def run(self, calls: dict, collective: bool = False):
        return {r: self.call(r, *c) for r, c in calls.items()}, []


def run_local(task: StageTask, progress: Callable[[str, int], None] | None = None) -> RunOutcome:
    """One worker (all experts, all partitions) in this process."""
    if task.world != 1:
        raise ValueError(f"run_local runs one worker; the task has {task.world} slices")
    threads = torch.get_num_threads()  # the worker sets the task's; the caller keeps its own
    try:
        return drive(_LocalPool(task), task, 0, progress)
    finally:
        torch.set_num_threads(threads)

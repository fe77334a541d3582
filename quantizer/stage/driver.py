"""The driver of a stage run, whatever the workers run on (``local``, ``processes``,
``ray_actors``): the phases in order — replay, then reduce (or keep), each phase's partitions
checked folded exactly once — the pooled Hessians, then GPTQ; lost workers replaced
(``distribute``'s docstring)."""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

from requant.quantizer.stage.distribute import StageTask
from requant.quantizer.stage.partition import assign
from requant.quantizer.stage.records import ReduceStep, ReplayStep, RunOutcome
from requant.quantizer.stage.worker import pooled_means


class WorkerLost(Exception):
    def __init__(self, ranks: list[int]):
        super().__init__(f"worker(s) {ranks} lost")
        self.ranks = ranks


class _LostInCollective(Exception):
    pass


class Pool:
    """Workers by rank, wherever they run: ``run`` sends calls (rank → (method, *args)) and
    returns (answers by rank, ranks lost) — with ``collective``, at the first loss, since the
    others may wait for it inside the collective; ``restart`` replaces a rank's worker."""

    def run(self, calls: dict, collective: bool = False) -> tuple[dict, list[int]]:
        raise NotImplementedError

    def restart(self, r: int) -> None:
        raise NotImplementedError

    def call(self, r: int, method: str, *args):
        out, lost = self.run({r: (method, *args)})
        if lost:
            raise WorkerLost(lost)
        return out[r]


def drive(pool: Pool, task: StageTask, max_retries: int, progress: Callable[[str, int], None] | None) -> RunOutcome:
    """Run the phases and GPTQ on ``pool`` (submit/wait/restart over ranks), replacing lost
    workers (module docstring)."""
    lost_count = [0] * task.world
    for attempt in range(max_retries + 1):
        try:
            return _attempt(pool, task, lost_count, max_retries, progress)
        except _LostInCollective as e:
            if attempt == max_retries:
                raise RuntimeError(f"a worker was lost inside a collective {attempt + 1} times; giving up") from e
            for r in range(task.world):
                pool.restart(r)
    raise AssertionError("unreachable")


def _attempt(pool: Pool, task: StageTask, lost_count: list[int], max_retries: int, progress) -> RunOutcome:
    W, plan = task.world, task.plan
    steps: list[ReplayStep | ReduceStep] = []
    walls: dict[str, float] = {}
    finished: list[int] = []         # phases whose Hessians sit on their owners

    def replaced(r: int) -> None:
        """A new worker for rank r, caught up on the finished phases for its experts alone."""
        while True:
            lost_count[r] += 1
            if lost_count[r] > max_retries:
                raise RuntimeError(f"worker {r} lost {lost_count[r]} times (limit {max_retries} retries)")
            pool.restart(r)
            try:
                for q in finished if task.slices[r] else []:
                    parts = list(range(len(plan.parts(task.phases[q].split))))
                    steps.append(replace(pool.call(r, "replay", q, parts, task.slices[r]), catch_up=True))
                    pool.call(r, "keep", q)
                return
            except WorkerLost:
                continue

    def run_step(calls: dict[int, tuple], collective: bool = False) -> dict[int, dict]:
        """Run ``calls`` (rank → (method, *args)) until each succeeded, replacing lost workers."""
        done: dict[int, dict] = {}
        todo = dict(calls)
        while todo:
            out, lost = pool.run(todo, collective=collective)
            if lost and collective:
                raise _LostInCollective(str(lost))
            done.update(out)
            for r in out:
                todo.pop(r)
            for r in lost:
                replaced(r)
        return done

    t0 = time.perf_counter()
    run_step({r: ("setup",) for r in range(W)})
    walls["start"] = time.perf_counter() - t0  # processes / actors up, block loaded, stores opened
    for ph, phase in enumerate(task.phases):
        parts = plan.parts(phase.split)
        name = f"{phase.split}/{phase.mode}"
        t0 = time.perf_counter()
        if task.parallel == "replicated":  # ranks without experts have nothing to replay
            calls = {r: ("replay", ph, list(range(len(parts))), task.slices[r]) for r in range(W) if task.slices[r]}
        else:
            share = assign(parts, W)
            calls = {r: ("replay", ph, share[r], None) for r in range(W)}
        for st in run_step(calls).values():
            steps.append(st)
            if progress:
                progress("rows", st.rows)
        walls[f"replay {name}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if task.parallel == "replicated":
            run_step({r: ("keep", ph) for r in calls})
        else:
            folded = sorted(i for st in steps if isinstance(st, ReplayStep) and st.phase == ph and st.all_experts
                            for i in st.partitions)
            if folded != list(range(len(parts))):
                raise RuntimeError(f"{phase.split} partitions folded {folded}, expected each of 0…{len(parts) - 1} "
                                   "exactly once: refusing to reduce a wrong sum")
            if W > 1:
                # from here on a lost worker takes its sums of this phase along: start over
                addr, port = run_step({0: ("free_port",)}, collective=True)[0]
                run_step({r: ("init_group", addr, port) for r in range(W)}, collective=True)
                for st in run_step({r: ("reduce", ph) for r in range(W)}, collective=True).values():
                    steps.append(st)
            else:
                run_step({0: ("keep", ph)})
        walls[f"reduce {name}"] = time.perf_counter() - t0
        finished.append(ph)
    t0 = time.perf_counter()
    pooled = None
    if task.low_tokens.kind == "shrink":  # every expert's slice of the pooled Hessian, summed here
        parts = run_step({r: ("pooled_part",) for r in range(W) if task.slices[r]})
        if len({(p.shifts, p.tokens) for p in parts.values()}) != 1:
            raise RuntimeError("workers disagree on the pooled Hessian's grid or token count")
        first = next(iter(parts.values()))
        pooled = pooled_means([p.parts for p in parts.values()], first.shifts, first.tokens)
    results = run_step({r: ("quantize", pooled) for r in range(W)})
    walls["gptq"] = time.perf_counter() - t0
    return RunOutcome([results[r] for r in range(W)], steps, walls)

"""The Ray capture job: replicas up, prompts fed, every prompt in the store exactly once.

    result = run_capture(spec)              # CaptureSpec (spec.py)

Flow: connect to Ray ($RAY_ADDRESS / ``ray_address``) or start a local one → reconcile the
ledger with the store (ledger.py) → start ``replicas`` vLLM servers as Ray actors (pool.py,
replica.py), wait until healthy → one pass of the feed/drain loop (capture_loop.py) over the
prompts not yet in the store → coverage loop (more passes until every expert has enough routed
tokens) → stop the servers (SIGINT: the plugin closes the store cleanly). Progress goes to
``status_file`` as JSON.
"""
from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .capture_loop import CaptureLoop
from .ledger import Ledger, StoreIndex, ledger_path, wait_writers_idle
from .pool import JobError, Replica, ReplicaPool, Stats
from .prompts import Prompt, load_prompts
from .records import write_json
from .spec import CaptureSpec


@dataclass
class ReplicaStatus:
    """One replica as the status file shows it."""
    index: int
    url: str
    pid: int
    up: bool
    restarts: int
    outstanding: int
    answered: int
    capture: dict | None

    @classmethod
    def of(cls, r: Replica) -> "ReplicaStatus":
        return cls(index=r.index, url=r.url, pid=r.pid, up=r.is_up, restarts=r.restarts,
                   outstanding=len(r.outstanding), answered=r.answered, capture=r.capture)


class CaptureJob:
    def __init__(self, spec: CaptureSpec, progress: bool = True, status_file: str | None = None):
        self.spec = spec
        self.progress = progress
        self.status_file = status_file
        self.stats = Stats(enforce_eager=spec.starts_eager())
        self.index = StoreIndex(spec.store)
        self.ledger: Ledger | None = None
        self.pool = ReplicaPool(spec, self.stats, time.strftime("%Y%m%dT%H%M%S"), changed=self._write_status)
        self.loop: CaptureLoop | None = None
        self.prompts: dict[str, Prompt] = {}
        self._bar = None
        self._cancel = False
        self._width: int | None = None

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
        cfg = self.spec.prompts
        cov = self.spec.coverage
        if cov is not None:  # the coverage loop draws more prompts from the same sampled order
            cfg = cfg.model_copy(update={"count": cov.max_prompts})
        return cfg

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
        self.loop = CaptureLoop(spec, self.pool, self.ledger, self.index, self.prompts, self.stats,
                                committed=self._refresh_counts, cancelled=lambda: self._cancel)
        done_at_start = {p.prompt_id for p in prompts} & self.ledger.done
        self.stats.prompts_total = len(prompts) if spec.coverage is None else (spec.prompts.count or len(prompts))
        self.stats.prompts_skipped = len(done_at_start)
        self.stats.add_stage("prompts", t0)
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
                    self.stats.add_stage("coverage_replay", t0)
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
            if self.pool:
                t0 = time.time()
                self.stats.state = "stopping"
                await self.pool.stop_all()
                self.stats.add_stage("shutdown", t0)
        return self._finish()

    async def _capture(self, todo: list[Prompt]) -> None:
        """One pass of the feed/drain loop (the servers started on the first)."""
        if not todo:
            return
        if not self.pool:
            await self.pool.start_all()
        t0 = time.time()
        if self.progress and self._bar is None:
            from tqdm import tqdm
            self._bar = tqdm(total=self.stats.prompts_total, desc="prompts captured", unit="prompt",
                             initial=self.stats.prompts_skipped, file=sys.stderr)
        elif self._bar is not None:
            self._bar.total = self.stats.prompts_total
        await self.loop.run(todo)
        self.stats.add_stage("capture", t0)

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
                "answered_per_replica": [r.answered for r in self.pool],
                "duplicates_ids": sorted(dup)[:10]}

    def _route_counts(self):
        from requant.quantizer.mtp.arch import load_block
        from requant.quantizer.stage.replay import ReplayConfig, route_counts

        master = self.spec.coverage.master or self.spec.model
        block = load_block(master)
        return route_counts(block, [self.spec.store], ReplayConfig())

    # -- status -------------------------------------------------------------------------
    def _refresh_counts(self) -> None:
        done = sum(1 for p in self.prompts if p in self.ledger.done)
        if self._bar is not None:
            self._bar.update(done - self._bar.n)
        self.stats.prompts_done = done
        self.stats.rows = self.index.total_rows
        self.stats.bytes = self.stats.rows * 2 * self._row_width()
        self.stats.queue_depth = self.loop.queue_depth() if self.loop is not None else 0
        self._write_status()

    def _row_width(self) -> int:
        if self._width is None:
            try:
                from requant.storage import CaptureStore
                self._width = CaptureStore.open(self.spec.store).meta.row_width
            except Exception:  # noqa: BLE001 — not created yet
                return 0
        return self._width

    def _write_status(self, reconcile: dict | None = None) -> None:
        if not self.status_file:
            return
        extra = {} if reconcile is None else {"reconcile": reconcile}
        write_json(self.status_file, {**self.stats.as_dict(), **extra,
                                      "replicas": [asdict(ReplicaStatus.of(r)) for r in self.pool]},
                   indent=None, durable=False)


def _report_reconcile(path: Path, recon: dict) -> None:
    """Say what the start-up reconcile repaired (the store is the truth; the ledger follows it)."""
    fixed = [f"{n} {what}" for what, n in (("damaged lines dropped", recon["damaged_lines_dropped"]),
                                           ("prompts ledgered but not in the store (to capture again)",
                                            recon["ledgered_not_in_store"])) if n]
    if fixed:
        print(f"requant: ledger {path} repaired from the store: {'; '.join(fixed)}", file=sys.stderr)


def run_capture(spec: CaptureSpec, progress: bool = True, status_file: str | None = None) -> dict:
    return CaptureJob(spec, progress=progress, status_file=status_file).run()

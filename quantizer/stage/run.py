"""The quantize stage: capture stores + MTP master + base checkpoint → a drop-in checkpoint
directory with the GPTQ'd MTP shard, a manifest and a quality report.

    run_quantize(QuantizeJob(stores=["runs/cap"], master="DeepSeek-V4-Flash", base="…-W4A16-FP8",
                             out="runs/out", replay="full", workers=8))

One function per phase:

1. ``check_inputs`` (cheap, before any work): master config → ``MTPSpec``, routed experts
   present, stores match the master (hidden size, hc_mult, rows), base has an index and is the
   same model, ``out`` does not exist. The stores are cut into calibration and held-out
   partitions (``partition``: seeded by prompt; ``holdout`` 0 for none).
2. ``plan_run``: workers, device, GPTQ batches and expert slices (``distribute``); each
   worker's peak memory estimated from the plan, and a plan ``memory_limit`` cannot hold
   refused (``memory_plan``).
3. ``dispatch``: data-parallel replay of the partitions, an exact reduction to each expert
   slice's owner, GPTQ there, held-out errors of what is written and of RTN — Ray actors,
   spawned processes, or this process.
4. ``merge``: the workers' packed tensors, records, routed-token counts and distances.
5. ``publish``: assemble into ``.<out>.tmp-*`` beside ``out`` (``assemble``), write manifest
   (``manifest``) and report, rename into place. Any failure removes the temp dir: no
   partial output.

The inputs are hashed (``provenance``) on a background thread while the workers run.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

from requant.quantizer.core.gptq import GPTQConfig
from requant.quantizer.core.memory import check as check_memory
from requant.quantizer.mtp.arch import MTPSpec, checkpoint_config, config_file, load_spec
from requant.quantizer.mtp.weights import tensor_files
from requant.quantizer.stage import manifest as manifest_mod
from requant.quantizer.stage.assemble import AssembleConfig, write_assembly
from requant.quantizer.stage.base_files import check_base_matches, read_base
from requant.quantizer.stage.distribute import KILL_ENV, StageTask, gptq_batch_size, phases_for, plan_slices
from requant.quantizer.stage.job import QuantizeJob
from requant.quantizer.stage.local import run_local
from requant.quantizer.stage.memory_plan import MemoryPlan, memory_facts, plan_memory
from requant.quantizer.stage.partition import PartitionPlan, assign, plan_partitions
from requant.quantizer.stage.processes import run_processes
from requant.quantizer.stage.provenance import hash_inputs, store_facts
from requant.quantizer.stage.ray_actors import run_ray
from requant.quantizer.stage.records import RunOutcome, TensorResult
from requant.quantizer.stage.replay import check_store_matches
from requant.quantizer.stage.report import write_report
from requant.storage.durable import fsync, fsync_tree

MANIFEST = "requant-manifest.json"


@dataclass
class QuantizeResult:
    out: Path
    shard: Path
    manifest: Path
    report: Path
    summary: dict = field(default_factory=dict)


# -- 1. inputs -------------------------------------------------------------------------------

def check_master(master: Path, spec: MTPSpec) -> dict[str, Path]:
    """Every routed expert's w1/w2/w3 and the MTP's own tensors must be in the master."""
    if not master.exists():
        raise FileNotFoundError(f"master checkpoint {master} does not exist")
    where = tensor_files(master)
    mtp = [n for n in where if n.startswith(spec.prefix)]
    if not mtp:
        raise ValueError(f"master {master}: no {spec.prefix}* tensors — the checkpoint has no MTP layer "
                         "(saved by a tool that drops it?)")
    missing = [spec.expert_name(e, p) + ".weight" for e in range(spec.n_experts) for p in ("w1", "w2", "w3")
               if spec.expert_name(e, p) + ".weight" not in where]
    if missing:
        raise ValueError(f"master {master}: missing {len(missing)} routed-expert tensors of the MTP layer, first "
                         f"{', '.join(missing[:3])}")
    return where


def _embed_source(spec: MTPSpec, where: dict[str, Path], base: Path) -> str | None:
    names = ["embed.weight", "model.embed_tokens.weight", "embed_tokens.weight", spec.prefix + "embed_tokens.weight"]
    return None if any(n in where for n in names) else str(base)


@dataclass
class Inputs:
    """The checked inputs of one run."""
    out: Path
    master: Path
    base: Path
    master_config: dict
    spec: MTPSpec
    where: dict[str, Path]          # the master's tensor name → file
    base_config: dict
    base_index: dict
    stores: list[dict]              # provenance.store_facts of each store
    plan: PartitionPlan

    @property
    def rows(self) -> int:
        return sum(s["rows"] for s in self.stores)


def check_inputs(job: QuantizeJob) -> Inputs:
    """Everything that can be checked before any work, and the partition plan."""
    out = Path(job.out).absolute()
    if out.exists():
        raise FileExistsError(f"output {out} already exists; choose a new --out (nothing is overwritten)")
    master, base = Path(job.master), Path(job.base)
    master_config = checkpoint_config(master)
    spec = load_spec(master_config)
    where = check_master(master, spec)
    check_store_matches(SimpleNamespace(spec=spec), list(job.stores))
    base_config, base_index = read_base(base)
    check_base_matches(spec, base_config, master_config,
                       where=f"{base / 'config.json'}, {config_file(master)}")
    if not out.parent.exists():
        raise FileNotFoundError(f"parent directory of --out {out} does not exist")
    if not os.access(out.parent, os.W_OK):  # before the work, not after it (a read-only mount too)
        raise PermissionError(f"parent directory of --out {out} is not writable")
    stores = [store_facts(s) for s in job.stores]
    plan = plan_partitions(list(job.stores), job.partitions, job.holdout, job.holdout_seed)
    return Inputs(out, master, base, master_config, spec, where, base_config, base_index, stores, plan)


# -- 2. plan ---------------------------------------------------------------------------------

@dataclass
class RunPlan:
    """How the run is split over workers, and what each may hold."""
    task: StageTask
    use_ray: bool
    local: bool                     # one worker in this process
    device: str
    gptq: GPTQConfig
    memory: MemoryPlan
    idle: dict[str, int]            # split → workers that replay none of its partitions


def _idle_workers(task: StageTask) -> dict[str, int]:
    """Per split with partitions: how many workers replay none of them (data-parallel)."""
    if task.parallel != "data":
        return {}
    out = {}
    for split in {p.split for p in task.phases}:
        n = sum(not a for a in assign(task.plan.parts(split), task.world))
        if n:
            out[split] = n
    return out


def plan_run(job: QuantizeJob, inputs: Inputs) -> RunPlan:
    """The workers' task; refuses, before any work, a plan the memory limit cannot hold, and
    warns of workers left without partitions or experts."""
    spec, plan = inputs.spec, inputs.plan
    use_ray = job.use_ray if job.use_ray is not None else job.workers > 1
    local = not use_ray and not (job.processes and job.workers > 1)
    device = job.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch = job.gptq_batch or gptq_batch_size(spec.n_experts, spec.hidden, spec.moe_inter, device)
    slices = plan_slices(spec.n_experts, batch, 1 if local else job.workers)
    gptq = GPTQConfig(damp=job.damp, act_order=job.act_order)
    task = StageTask(master=str(inputs.master), embed_from=_embed_source(spec, inputs.where, inputs.base), plan=plan,
                     phases=phases_for(job.replay, heldout=bool(plan.heldout)), slices=slices, batch=batch,
                     replay=job.replay, parallel=job.parallel,
                     w2_weighting=job.w2_weighting, max_bytes=job.max_bytes, max_rows=job.max_rows,
                     fold_rows=job.fold_rows, device=device if local else None, gptq=gptq,
                     low_tokens=job.low_token_policy,
                     threads=torch.get_num_threads() if device == "cpu" else None,
                     kill_marker=os.environ.get(KILL_ENV) or None)
    memory = plan_memory(job, spec, inputs.where, inputs.master_config, task, device)
    check_memory(memory.estimate, memory.limit, memory.limit_source)
    idle = _idle_workers(task)
    for split, n in idle.items():  # stacklevel: the caller of run_quantize
        warnings.warn(f"{n} of {task.world} workers replay no {split} partition ({len(plan.parts(split))} "
                      f"partitions): they only reduce and quantise", stacklevel=3)
    if not slices[-1]:
        warnings.warn(f"{sum(not s for s in slices)} of {task.world} workers own no experts ({len(slices[0])}-expert "
                      f"GPTQ batches): they only replay and reduce", stacklevel=3)
    return RunPlan(task, use_ray, local, device, gptq, memory, idle)


# -- 3. dispatch -----------------------------------------------------------------------------


class _Bars:
    """tqdm bars for replayed rows and quantised tensors (no-ops when progress is off), or a
    caller's ``fn(phase, n, total)`` (the orchestrator reports job progress with it)."""

    def __init__(self, enabled, rows: int, tensors: int):
        self.bars = {}
        self.fn = enabled if callable(enabled) else None
        self.totals = {"rows": rows, "tensors": tensors}
        if enabled is True:
            from tqdm import tqdm

            self.bars = {"rows": tqdm(total=rows, desc="replay rows", unit="row", unit_scale=True),
                         "tensors": tqdm(total=tensors, desc="GPTQ tensors", unit="tensor")}

    def __call__(self, phase: str, n: int) -> None:
        if phase in self.bars:
            self.bars[phase].update(n)
        if self.fn is not None:
            self.fn(phase, n, self.totals.get(phase, 0))

    def close(self) -> None:
        for b in self.bars.values():
            b.close()


def dispatch(job: QuantizeJob, rp: RunPlan, progress: Callable[[str, int], None]) -> RunOutcome:
    """Replay, reduce and GPTQ on the plan's workers: Ray actors, spawned processes or this process."""
    if rp.use_ray:
        return run_ray(rp.task, job.ray_retries, progress)
    if not rp.local:
        return run_processes(rp.task, torch.cuda.device_count() if rp.device.startswith("cuda") else 0,
                             job.ray_retries, progress)
    return run_local(rp.task, progress)


# -- 4. merge --------------------------------------------------------------------------------

@dataclass
class Merged:
    """The workers' results as one."""
    packed: dict[str, torch.Tensor]                  # every routed expert's packed tensors
    records: list[TensorResult]                      # per tensor, expert order
    distance: dict[int, tuple[float, float]]         # replay=both: expert → identity-vs-full distances
    by_phase: dict[tuple[str, str], list[int]]       # (split, mode) → routed tokens per expert
    quant_mode: str                                  # the mode GPTQ's Hessians were replayed in

    @property
    def tokens(self) -> list[int]:
        """Routed calibration tokens per expert of the pass GPTQ used."""
        return self.by_phase[("calibration", self.quant_mode)]


def merge(outcome: RunOutcome, task: StageTask) -> Merged:
    packed: dict[str, torch.Tensor] = {}
    records: list[TensorResult] = []
    distance: dict[int, tuple[float, float]] = {}
    for r in outcome.results:
        packed.update(r.tensors)
        records += r.records
        distance.update(r.distance)
    owners = [r for r in outcome.results if r.experts]
    if any(r.tokens != owners[0].tokens for r in owners):
        raise RuntimeError("workers disagree on the routing counts: replay is not deterministic here")
    by_phase = {(p.split, p.mode): owners[0].tokens[i] for i, p in enumerate(task.phases)}
    return Merged(packed, records, distance, by_phase, task.phases[-1].mode)


# -- 5. publish ------------------------------------------------------------------------------

def publish(job: QuantizeJob, inputs: Inputs, rp: RunPlan, outcome: RunOutcome, merged: Merged,
            hashes: Future, timings: dict[str, float], t_start: float) -> QuantizeResult:
    """Assembly, manifest and report into a temp dir beside ``out``, renamed into place; a
    failed write publishes nothing."""
    out, spec, task = inputs.out, inputs.spec, rp.task
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        facts = write_assembly(tmp, inputs.base, inputs.base_config, inputs.base_index, spec, inputs.master,
                               inputs.master_config, merged.packed,
                               AssembleConfig(fp8_scale=job.fp8_scale, spec=rp.gptq.spec,
                                              actorder="weight" if job.act_order else None),
                               durable=job.durable)
        timings["assemble"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        input_hashes = hashes.result()
        timings["hash_wait"] = time.perf_counter() - t0

        workers = manifest_mod.worker_facts(outcome.results, outcome.steps)
        memory = memory_facts(rp.memory, outcome.results)
        summary = manifest_mod.summary(job, spec, out, merged.records, merged.tokens, inputs.plan, task, workers,
                                       rp.idle, rp.use_ray, inputs.rows, timings)
        summary["peak_memory_per_worker"] = memory["peak_per_worker"]
        summary["peak_memory_estimate"] = memory["estimate"]["peak"]
        manifest = manifest_mod.build(job=job, spec=spec, inputs=input_hashes, stores=inputs.stores, plan=inputs.plan,
                                      phases=task.phases, gptq=rp.gptq, batch=task.batch, merged=merged,
                                      workers=workers, memory=memory, cluster=outcome.cluster, assembly=facts,
                                      timings=timings, summary=summary)
        summary["seconds_total"] = time.perf_counter() - t_start  # so far; final value below
        t0 = time.perf_counter()
        report = write_report(tmp, manifest, job.min_tokens)
        timings["report"] = time.perf_counter() - t0
        timings["total"] = summary["seconds_total"] = time.perf_counter() - t_start
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        if job.durable:
            fsync_tree(tmp)
        if out.exists():
            raise FileExistsError(f"output {out} appeared while quantising; result left unpublished")
        os.rename(tmp, out)
        tmp = None
        if job.durable:
            fsync(out.parent)
    except OSError as e:
        if tmp is None or e.errno is None:  # not a failed write into the temp dir
            raise
        # disk full, I/O error: the temp dir goes (below), nothing is published
        raise OSError(e.errno, f"{out}: writing the output failed ({e.strerror or e}"
                      f"{f': {e.filename}' if e.filename else ''}); nothing was published") from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return QuantizeResult(out=out, shard=out / facts["shard"], manifest=out / MANIFEST,
                          report=out / report.name, summary=summary)


# -- the stage -------------------------------------------------------------------------------

def run_quantize(job: QuantizeJob, progress: bool | Callable[[str, int, int], None] = True) -> QuantizeResult:
    """Run the stage (module docstring). ``progress``: tqdm bars (True), nothing (False), or a
    callback ``(phase, n, total)`` with phase "rows" (store rows replayed, summed over workers
    and passes) or "tensors" (tensors quantised)."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    inputs = check_inputs(job)
    timings["checks"] = time.perf_counter() - t_start
    rp = plan_run(job, inputs)
    task, spec = rp.task, inputs.spec
    copies = 1 if job.parallel == "data" else task.world
    bars = _Bars(progress, copies * sum(inputs.plan.rows(p.split) for p in task.phases), 3 * spec.n_experts)
    hasher = ThreadPoolExecutor(1)
    hashes = hasher.submit(hash_inputs, inputs.master, inputs.where, spec, inputs.base, inputs.base_index)
    try:
        t0 = time.perf_counter()
        outcome = dispatch(job, rp, bars)
        timings["hessians_gptq"] = time.perf_counter() - t0
        timings |= outcome.walls  # the phases inside it, as the driver saw them
        bars("tensors", 3 * spec.n_experts)
        bars.close()
        return publish(job, inputs, rp, outcome, merge(outcome, task), hashes, timings, t_start)
    finally:
        bars.close()
        hasher.shutdown(wait=True, cancel_futures=True)


def format_summary(s: dict) -> str:
    def f(x):
        return "—" if x is None else f"{x:.3e}"

    if s.get("err_gptq_heldout_mean") is not None:
        quality = (f"held-out rel. output error GPTQ {f(s['err_gptq_heldout_mean'])} vs RTN "
                   f"{f(s['err_rtn_heldout_mean'])} ({s['heldout_not_below_rtn']} tensor(s) not below RTN; "
                   f"in-sample {f(s['err_gptq_mean'])} vs {f(s['err_rtn_mean'])})")
    else:
        quality = f"in-sample rel. output error GPTQ {f(s['err_gptq_mean'])} vs RTN {f(s['err_rtn_mean'])} (no held-out split)"
    gb = [b / 1e9 for b in s["bytes_read_per_worker"]]
    return (f"{s['out']}: {s['tensors']} tensors of {s['experts']} {s['arch'].upper()} MTP experts, "
            f"{s['rows']:,} rows ({s['rows_heldout']:,} held out) in {s['partitions']} partitions, replay {s['replay']}, "
            f"{s['workers']} worker(s){' on Ray' if s['ray'] else ''} ({s['parallel']}; store GB read per worker "
            f"{', '.join(f'{x:.3g}' for x in gb)}), {quality}, {s['under_covered']} under-covered expert(s), "
            f"{s['not_gptq']} tensor(s) off the GPTQ path, {s['seconds_total']:.1f} s")

"""The quantize stage: capture stores + MTP master + base checkpoint → a drop-in checkpoint
directory with the GPTQ'd MTP shard, a manifest and a quality report.

    run_quantize(QuantizeJob(stores=["runs/cap"], master="DeepSeek-V4-Flash", base="…-W4A16-FP8",
                             out="runs/out", replay="full", workers=8))

1. Check inputs (cheap, before any work): master config → ``MTPSpec``, routed experts present,
   stores match the master (hidden size, hc_mult, rows), base has an index and is the same
   model, ``out`` does not exist. Cut the stores into calibration and held-out partitions
   (``partition``: seeded by prompt; ``holdout`` 0 for none). Estimate each worker's peak
   memory from the plan and refuse one that ``memory_limit`` cannot hold (``memory``).
2. Hessians + GPTQ (``distribute``): data-parallel replay of the partitions, an exact
   reduction to each expert slice's owner, GPTQ there, held-out errors of what is written and
   of RTN — Ray actors, spawned processes, or this process.
3. Assemble into ``.<out>.tmp-*`` beside ``out`` (``assemble``), write manifest + report,
   rename into place. Any failure removes the temp dir: no partial output.
Inputs are hashed on a background thread while the GPU works.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

from requant.quantizer.mtp.arch import MTPSpec, checkpoint_config, config_file, load_spec
from requant.storage.durable import fsync, fsync_tree
from requant.quantizer.stage.assemble import (AssembleConfig, check_base_matches, read_base, safetensors_header,
                       write_assembly)
from requant.quantizer.stage.distribute import (KILL_ENV, PARALLEL, StageTask, gptq_batch_size, phases_for, plan_slices, run_local,
                         run_processes, run_ray)
from requant.quantizer.core.experts import LowTokenPolicy
from requant.quantizer.core.gptq import GPTQConfig
from requant.quantizer.core.limits import FOLD_ROWS, MAX_BYTES, MAX_ROWS
from requant.quantizer.core.memory import GIB, Shapes, check as check_memory, estimate as estimate_memory
from requant.quantizer.stage.job import REPLAYS, QuantizeJob
from requant.quantizer.stage.partition import assign, plan_partitions
from requant.quantizer.stage.replay import check_store_matches
from requant.quantizer.stage.report import write_report
from requant.quantizer.mtp.weights import tensor_files

MANIFEST = "requant-manifest.json"


@dataclass
class QuantizeResult:
    out: Path
    shard: Path
    manifest: Path
    report: Path
    summary: dict = field(default_factory=dict)


# -- input checks and provenance -------------------------------------------------------------

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


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _hash_tensors(where: dict[str, Path], names: list[str], threads: int = 8) -> str:
    """sha256 over the per-tensor sha256s of ``names`` (each over name, dtype, shape, raw bytes) —
    the master's MTP layer, not the whole (hundreds of GB) checkpoint; tensors hashed in
    parallel threads (hashlib and file reads release the GIL)."""
    heads = {p: safetensors_header(p) for p in set(where[n] for n in names)}
    starts = {}
    for p in heads:
        with open(p, "rb") as f:
            starts[p] = 8 + int.from_bytes(f.read(8), "little")

    def one(n: str) -> str:
        p = where[n]
        a, b = heads[p][n]["data_offsets"]
        h = hashlib.sha256(json.dumps([n, heads[p][n]["dtype"], heads[p][n]["shape"]]).encode())
        with open(p, "rb") as f:
            f.seek(starts[p] + a)
            left = b - a
            while left:
                chunk = f.read(min(left, 1 << 26))
                h.update(chunk)
                left -= len(chunk)
        return h.hexdigest()

    with ThreadPoolExecutor(threads) as pool:
        digests = list(pool.map(one, sorted(names)))
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def _hash_inputs(master: Path, where: dict[str, Path], spec: MTPSpec, base: Path, base_index: dict) -> dict:
    cfg = config_file(master)
    shards = {}
    for f in sorted(set(base_index["weight_map"].values())):
        p = base / f
        with open(p, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            shards[f] = {"bytes": p.stat().st_size, "header_sha256": hashlib.sha256(fh.read(n)).hexdigest()}
    return {"master": {"path": str(master), "config_sha256": _sha256_file(cfg),
                       "mtp_tensors_sha256": _hash_tensors(where, [n for n in where if n.startswith(spec.prefix)]),
                       "mtp_tensors_hash": "sha256 of the concatenated hex sha256s of each tensor "
                                           "(name, dtype, shape json + raw bytes), tensors sorted by name"},
            "base": {"path": str(base), "config_sha256": _sha256_file(base / "config.json"),
                     "index_sha256": _sha256_file(base / "model.safetensors.index.json"), "shards": shards}}


def store_facts(path: str) -> dict:
    """Identity of a capture store: its metadata, committed rows per writer group, and an id
    (sha256 of both) that changes whenever rows are added."""
    from requant.storage import CaptureStore, CorruptStoreError

    st = CaptureStore.open(path)
    problems = st.verify(read_rows=False)  # damage found in seconds, not after the master is loaded
    if problems:
        raise CorruptStoreError(problems[0] + (f" (and {len(problems) - 1} more problems: requant store verify {path})"
                                               if len(problems) > 1 else ""))
    groups = {g: dict(zip(("rows", "sequences"), st.committed(g))) for g in st.writer_names()}
    meta = st.meta.to_json()
    ident = hashlib.sha256(json.dumps([meta, groups], sort_keys=True).encode()).hexdigest()[:16]
    return {"path": str(path), "id": ident, "rows": sum(g["rows"] for g in groups.values()),
            "sequences": sum(g["sequences"] for g in groups.values()), "groups": groups,
            "model": meta.get("model"), "capture_point": meta.get("capture_point"),
            "created_at": meta.get("created_at"), "requant_version": meta.get("requant_version")}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("requant", "safetensors", "zarr", "ray"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


# -- the stage ---------------------------------------------------------------------------------

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


def run_quantize(job: QuantizeJob, progress: bool | Callable[[str, int, int], None] = True) -> QuantizeResult:
    """Run the stage (module docstring). ``progress``: tqdm bars (True), nothing (False), or a
    callback ``(phase, n, total)`` with phase "rows" (store rows replayed, summed over workers
    and passes) or "tensors" (tensors quantised)."""
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
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
    rows = sum(s["rows"] for s in stores)
    plan = plan_partitions(list(job.stores), job.partitions, job.holdout, job.holdout_seed)
    timings["checks"] = time.perf_counter() - t_start

    use_ray = job.use_ray if job.use_ray is not None else job.workers > 1
    local = not use_ray and not (job.processes and job.workers > 1)
    device = job.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch = job.gptq_batch or gptq_batch_size(spec.n_experts, spec.hidden, spec.moe_inter, device)
    slices = plan_slices(spec.n_experts, batch, 1 if local else job.workers)
    gptq = GPTQConfig(damp=job.damp, act_order=job.act_order)
    phases = phases_for(job.replay, heldout=bool(plan.heldout))
    task = StageTask(master=str(master), embed_from=_embed_source(spec, where, base), plan=plan, phases=phases,
                     slices=slices, batch=batch, replay=job.replay, parallel=job.parallel,
                     w2_weighting=job.w2_weighting, max_bytes=job.max_bytes, max_rows=job.max_rows,
                     fold_rows=job.fold_rows, device=device if local else None, gptq=gptq,
                     low_tokens=job.low_token_policy,
                     threads=torch.get_num_threads() if device == "cpu" else None,
                     kill_marker=os.environ.get(KILL_ENV) or None)
    memory = _memory_plan(job, spec, where, master_config, task, device)
    check_memory(memory["estimate"], memory["limit"], memory["limit_source"])  # before any work
    idle = _idle_workers(task)
    for split, n in idle.items():
        warnings.warn(f"{n} of {task.world} workers replay no {split} partition ({len(plan.parts(split))} "
                      f"partitions): they only reduce and quantise", stacklevel=2)
    if not slices[-1]:
        warnings.warn(f"{sum(not s for s in slices)} of {task.world} workers own no experts ({len(slices[0])}-expert "
                      f"GPTQ batches): they only replay and reduce", stacklevel=2)
    copies = 1 if job.parallel == "data" else task.world
    bars = _Bars(progress, copies * sum(plan.rows(p.split) for p in phases), 3 * spec.n_experts)
    tmp = None
    writing = False
    hasher = ThreadPoolExecutor(1)
    hashes = hasher.submit(_hash_inputs, master, where, spec, base, base_index)
    try:
        t0 = time.perf_counter()
        if use_ray:
            run = run_ray(task, job.ray_retries, bars)
        elif not local:
            run = run_processes(task, torch.cuda.device_count() if device.startswith("cuda") else 0,
                                job.ray_retries, bars)
        else:
            run = run_local(task, bars)
        results, steps, ray_info = run.results, run.steps, run.cluster
        timings["hessians_gptq"] = time.perf_counter() - t0
        timings |= run.walls  # the phases inside it, as the driver saw them
        bars("tensors", 3 * spec.n_experts)
        bars.close()

        packed: dict[str, torch.Tensor] = {}
        records: list[dict] = []
        distance: dict[int, tuple[float, float]] = {}
        for r in results:
            packed.update(r.tensors)
            records += r.records
            distance.update(r.distance)
        owners = [r for r in results if r.experts]
        if any(r.tokens != owners[0].tokens for r in owners):
            raise RuntimeError("workers disagree on the routing counts: replay is not deterministic here")
        by_phase = {(p.split, p.mode): owners[0].tokens[i] for i, p in enumerate(phases)}
        quant_mode = phases[-1].mode
        tokens = by_phase[("calibration", quant_mode)]

        t0 = time.perf_counter()
        writing = True
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        facts = write_assembly(tmp, base, base_config, base_index, spec, master, master_config, packed,
                               AssembleConfig(fp8_scale=job.fp8_scale, spec=gptq.spec,
                                              actorder="weight" if job.act_order else None),
                               durable=job.durable)
        timings["assemble"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        inputs = hashes.result()
        timings["hash_wait"] = time.perf_counter() - t0

        workers = _worker_facts(task, results, steps)
        memory = _memory_facts(memory, results)
        summary = _summary(job, spec, out, records, tokens, plan, task, workers, idle, use_ray, rows, timings)
        summary["peak_memory_per_worker"] = memory["peak_per_worker"]
        summary["peak_memory_estimate"] = memory["estimate"]["peak"]
        manifest = {
            "format": "requant.quantize/2",
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "versions": _versions() | ({"ray": ray_info["ray"]} if ray_info else {}),
            "job": asdict(job),
            "spec": asdict(spec),
            "inputs": inputs,
            "stores": stores,
            "replay": job.replay,
            "w2_weighting": job.w2_weighting,
            "partitions": plan.describe(),
            "phases": [asdict(p) for p in phases],
            "gptq": {"damp": job.damp, "act_order": job.act_order, "low_tokens": asdict(job.low_token_policy),
                     "block_size": gptq.block_size,
                     "group_size": gptq.spec.group_size, "num_bits": gptq.spec.num_bits, "symmetric": True,
                     "batch": batch, "damp_growth": gptq.damp_growth, "damp_max": gptq.damp_max},
            "error_definitions": ERROR_DEFINITIONS,
            "tokens_per_expert": tokens,
            "tokens_per_expert_identity": by_phase.get(("calibration", "identity")) if job.replay == "both" else None,
            "tokens_per_expert_heldout": by_phase.get(("heldout", quant_mode)),
            "hessian_distance": {str(e): list(v) for e, v in sorted(distance.items())} or None,
            "tensors": records,
            "errors": [{"tensor": r["name"], "path": r["path"], "tokens": r["tokens"]}
                       for r in records if r["path"] != "gptq"],
            "heldout_not_below_rtn": [r["name"] for r in records if r.get("heldout_not_below_rtn")],
            "workers": workers,
            "memory": memory,
            "cluster": ray_info,
            "assembly": facts,
            "timings": timings,
            "summary": summary,
        }
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
        if not writing or tmp is None or e.errno is None:  # not a failed write into the temp dir
            raise
        # disk full, I/O error: the temp dir goes (below), nothing is published
        raise OSError(e.errno, f"{out}: writing the output failed ({e.strerror or e}"
                      f"{f': {e.filename}' if e.filename else ''}); nothing was published") from e
    finally:
        bars.close()
        hasher.shutdown(wait=True, cancel_futures=True)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return QuantizeResult(out=out, shard=out / facts["shard"], manifest=out / MANIFEST,
                          report=out / report.name, summary=summary)


ERROR_DEFINITIONS = {
    "err_gptq": "in-sample: tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) of the written tensor on the calibration Hessian GPTQ fitted",
    "err_rtn": "in-sample: the same for round-to-nearest",
    "err_gptq_heldout": "held-out: the written tensor's error on the Hessian of the held-out prompts' sequences",
    "err_rtn_heldout": "held-out: the same for round-to-nearest",
    "heldout_not_below_rtn": "the written tensor's held-out error is not below RTN's (GPTQ did no good there)",
}


def _block_bytes(spec: MTPSpec, where: dict[str, Path], master_config: dict) -> tuple[int, int]:
    """(bytes of the block's weights as a worker holds them, of which the routed experts): bf16
    stacks of the experts, the MTP's other tensors in bf16 (their FP8 scales consumed), and the
    embedding where the MTP layer has none of its own."""
    experts = 2 * 3 * spec.n_experts * spec.moe_inter * spec.hidden
    heads = {f: safetensors_header(f) for f in {where[n] for n in where if n.startswith(spec.prefix)}}
    expert_names = {spec.expert_name(e, p) for e in range(spec.n_experts) for p in ("w1", "w2", "w3")}
    other, embed = 0, False
    for name, f in where.items():
        if not name.startswith(spec.prefix) or name.rsplit(".", 1)[0] in expert_names:
            continue
        if name.endswith(("scale", "scale_inv")):
            continue
        embed |= "embed" in name
        numel = 1
        for d in heads[f][name]["shape"]:
            numel *= int(d)
        other += 2 * numel
    if not embed:
        other += 2 * int(master_config.get("vocab_size") or 0) * spec.hidden
    return experts + other, experts


def _memory_limit(job: QuantizeJob, device: str) -> tuple[int, str]:
    if job.memory_limit is not None:
        return job.memory_limit, "memory_limit"
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return props.total_memory, f"{props.name}'s memory"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // job.workers, (f"this host's {total / GIB:.1f} GiB" + (f" / {job.workers} workers"
                                                                        if job.workers > 1 else ""))


def _memory_plan(job: QuantizeJob, spec: MTPSpec, where: dict[str, Path], master_config: dict,
                 task: StageTask, device: str) -> dict:
    """The per-worker memory estimate of this plan (``memory.estimate``) and the limit."""
    block, experts = _block_bytes(spec, where, master_config)
    largest = max(p.rows for ph in task.phases for p in task.plan.parts(ph.split))
    per_call = min(job.max_rows or largest, largest)
    own = max(len(sl) for sl in task.slices)
    row_bytes = 2 * spec.hc_mult * spec.hidden + 24
    est = estimate_memory(Shapes(spec.n_experts, spec.hidden, spec.moe_inter, spec.topk, block, experts),
                          [(p.split, p.mode) for p in task.phases],
                          accumulate=spec.n_experts if task.parallel == "data" else own, own=own, batch=task.batch,
                          rows_per_call=per_call, window_rows=min(largest, max(job.fold_rows, per_call)),
                          gptq_batch=task.batch, device=device,
                          host_rows_bytes=min(job.max_bytes, 2 * largest * row_bytes))
    limit, source = _memory_limit(job, device)
    return {"estimate": est, "limit": limit, "limit_source": source, "device": device}


def _memory_facts(memory: dict, results: list) -> dict:
    """The manifest's memory section: the estimate per step, the limit, and each worker's
    measured peak per step (device: ``torch.cuda.max_memory_allocated``; host: peak RSS)."""
    est = memory["estimate"]
    kind = "device" if memory["device"].startswith("cuda") else "host"
    measured = [{"rank": r.rank, "steps": r.memory} for r in results]
    peaks = [max((m.get(kind, m.get(f"{kind}_lifetime", 0)) for m in r.memory.values()), default=0) for r in results]
    return {"limit": memory["limit"], "limit_source": memory["limit_source"], "measured_kind": kind,
            "estimate": {"peak": est["peak"], "peak_step": est["peak_step"],
                         "steps": {k: v["bytes"] for k, v in est["steps"].items()},
                         "parts": {k: v["parts"] for k, v in est["steps"].items()}},
            "peak_per_worker": peaks, "workers": measured}


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


def _worker_facts(task: StageTask, results: list, steps: list[dict]) -> list[dict]:
    """Per worker: experts, device, the partitions it replayed per phase, rows, store bytes read."""
    out = []
    for r in results:
        mine = [st for st in steps if st["rank"] == r.rank and "partitions" in st and "rows" in st]
        out.append({"rank": r.rank, "experts": [r.experts[0], r.experts[-1]] if r.experts else [],
                    "device": r.device, "pid": r.pid,
                    "replay_pids": sorted({st["pid"] for st in mine}),
                    "partitions": {f"{st['split']}/{st['mode']}": st["partitions"] for st in mine
                                   if not st.get("catch_up")},
                    "caught_up": sorted({f"{st['split']}/{st['mode']}" for st in mine if st.get("catch_up")}),
                    "rows": sum(st["rows"] for st in mine), "bytes_read": sum(st["bytes_read"] for st in mine),
                    "bytes_reduced": sum(st.get("bytes_reduced", 0) for st in steps if st["rank"] == r.rank),
                    "seconds": r.seconds})
    return out


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _summary(job, spec, out, records, tokens, plan, task, workers, idle, use_ray, rows, timings) -> dict:
    heldout = bool(plan.heldout)
    return {
        "out": str(out), "arch": spec.arch, "experts": spec.n_experts, "tensors": len(records),
        "rows": rows, "rows_calibration": plan.rows("calibration"), "rows_heldout": plan.rows("heldout"),
        "replay": job.replay, "workers": task.world, "ray": use_ray, "parallel": job.parallel,
        "partitions": len(plan.calibration), "partitions_heldout": len(plan.heldout),
        "idle_replay_workers": idle,
        "idle_gptq_workers": sum(not sl for sl in task.slices),
        "bytes_read_per_worker": [w["bytes_read"] for w in workers],
        "rows_per_worker": [w["rows"] for w in workers],
        "err_gptq_mean": _mean([r["err_gptq"] for r in records]),          # in-sample
        "err_rtn_mean": _mean([r["err_rtn"] for r in records]),            # in-sample
        "err_gptq_heldout_mean": _mean([r.get("err_gptq_heldout") for r in records]) if heldout else None,
        "err_rtn_heldout_mean": _mean([r.get("err_rtn_heldout") for r in records]) if heldout else None,
        "heldout_not_below_rtn": sum(bool(r.get("heldout_not_below_rtn")) for r in records) if heldout else None,
        "under_covered": sum(t < job.min_tokens for t in tokens),
        "not_gptq": sum(r["path"] != "gptq" for r in records), "seconds_total": 0.0,
        "timings": timings,             # phase → seconds (same dict as the manifest's)
    }


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

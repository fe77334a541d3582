"""The quantize stage: capture stores + MTP master + base checkpoint → a drop-in checkpoint
directory with the GPTQ'd MTP shard, a manifest and a quality report.

    run_quantize(QuantizeJob(stores=["runs/cap"], master="DeepSeek-V4-Flash", base="…-W4A16-FP8",
                             out="runs/out", replay="full", workers=8))

1. Check inputs (cheap, before any work): master config → ``MTPSpec``, routed experts present,
   stores match the master (hidden size, hc_mult, rows), base has an index and is the same
   model, ``out`` does not exist.
2. Hessians + GPTQ, expert-parallel (``distribute``): Ray tasks or this process.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

from .arch import MTPSpec, check_config, load_spec
from .assemble import (AssembleConfig, check_base_matches, fsync_dir, read_base, safetensors_header,
                       write_assembly)
from .distribute import KILL_ENV, SliceTask, gptq_batch_size, plan_slices, run_local, run_processes, run_ray
from .gptq import GPTQConfig
from .limits import MAX_BYTES, MAX_ROWS
from .replay import check_store_matches
from .report import write_report
from .weights import _shards, read_json

REPLAYS = ("identity", "full", "both")
MANIFEST = "requant-manifest.json"


@dataclass(frozen=True)
class QuantizeJob:
    stores: list[str]
    master: str
    base: str
    out: str
    replay: str = "identity"        # identity | full | both (both: quantise with full, report the distance)
    workers: int = 1                # expert-parallel workers (GPUs); >1 uses Ray unless use_ray=False
    use_ray: bool | None = None     # None: Ray when workers > 1
    processes: bool = False         # no Ray, workers > 1: one spawned process per slice (GPU g each)
    act_order: bool = False
    w2_weighting: str = "none"
    min_tokens: int = 64            # report flags experts below this
    device: str | None = None       # None: cuda if available else cpu
    damp: float = 0.01
    gptq_batch: int | None = None   # experts per GPTQ batch; None: from the device (fixed per run)
    max_bytes: int = MAX_BYTES      # replay's host memory bound per worker
    max_rows: int | None = MAX_ROWS  # rows per block call (bounds the replay's device memory)
    fp8_scale: str = "auto"         # FP8 pass-through scale naming: auto | keep | .scale | .weight_scale_inv | .weight_scale
    ray_retries: int = 2            # retries of a lost worker (Ray task, or spawned process)
    durable: bool = True            # fsync the output before publishing it

    def __post_init__(self):
        if self.replay not in REPLAYS:
            raise ValueError(f"replay must be one of {REPLAYS}, got {self.replay!r}")
        if self.workers < 1:
            raise ValueError(f"workers must be ≥ 1, got {self.workers}")
        if not self.stores:
            raise ValueError("no capture stores given")


@dataclass
class QuantizeResult:
    out: Path
    shard: Path
    manifest: Path
    report: Path
    summary: dict = field(default_factory=dict)


# -- input checks and provenance -------------------------------------------------------------

def _master_config(master: Path) -> dict:
    f = (master if master.is_dir() else master.parent) / "config.json"
    if not f.exists():
        raise FileNotFoundError(f"master {master}: no config.json (needed to identify the MTP layer)")
    return check_config(read_json(f, "checkpoint config"), str(f))


def check_master(master: Path, spec: MTPSpec) -> dict[str, Path]:
    """Every routed expert's w1/w2/w3 and the MTP's own tensors must be in the master."""
    if not master.exists():
        raise FileNotFoundError(f"master checkpoint {master} does not exist")
    where = _shards(master)
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
    cfg = (master if master.is_dir() else master.parent) / "config.json"
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

def _fsync_tree(d: Path) -> None:
    """Everything written (small files; the shard was fsynced as written; hard links are clean)
    reaches the disk before the rename publishes it."""
    for p in d.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(d)


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
    master_config = _master_config(master)
    spec = load_spec(master_config)
    where = check_master(master, spec)
    check_store_matches(SimpleNamespace(spec=spec), list(job.stores))
    base_config, base_index = read_base(base)
    check_base_matches(spec, base_config, master_config,
                       where=f"{base / 'config.json'}, {(master if master.is_dir() else master.parent) / 'config.json'}")
    if not out.parent.exists():
        raise FileNotFoundError(f"parent directory of --out {out} does not exist")
    if not os.access(out.parent, os.W_OK):  # before the work, not after it (a read-only mount too)
        raise PermissionError(f"parent directory of --out {out} is not writable")
    stores = [store_facts(s) for s in job.stores]
    rows = sum(s["rows"] for s in stores)
    timings["checks"] = time.perf_counter() - t_start

    hasher = ThreadPoolExecutor(1)
    hashes = hasher.submit(_hash_inputs, master, where, spec, base, base_index)
    use_ray = job.use_ray if job.use_ray is not None else job.workers > 1
    device = job.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch = job.gptq_batch or gptq_batch_size(spec.n_experts, spec.hidden, spec.moe_inter, device)
    slices = plan_slices(spec.n_experts, batch, job.workers)
    gptq = GPTQConfig(damp=job.damp, act_order=job.act_order)
    embed_from = _embed_source(spec, where, base)
    tasks = [SliceTask(index=g, experts=ex, master=str(master), embed_from=embed_from, stores=list(job.stores),
                       replay=job.replay, w2_weighting=job.w2_weighting, max_bytes=job.max_bytes,
                       max_rows=job.max_rows,
                       device=None if use_ray or job.processes else device, gptq=gptq, batch=batch,
                       threads=torch.get_num_threads() if device == "cpu" else None,
                       kill_marker=os.environ.get(KILL_ENV) or None)
             for g, ex in enumerate(slices)]
    passes = 2 if job.replay == "both" else 1
    bars = _Bars(progress, rows * passes * len(tasks), 3 * spec.n_experts)
    ray_info = None
    tmp = None
    writing = False
    try:
        t0 = time.perf_counter()
        if use_ray:
            results, ray_info = run_ray(tasks, job.ray_retries, bars)
        elif job.processes and len(tasks) > 1:
            results = run_processes(tasks, torch.cuda.device_count() if device.startswith("cuda") else 0,
                                    job.ray_retries, bars)
        else:
            results = run_local(tasks, bars)
        timings["hessians_gptq"] = time.perf_counter() - t0
        bars.close()

        packed: dict[str, torch.Tensor] = {}
        records: list[dict] = []
        distance: dict[int, tuple[float, float]] = {}
        for r in results:
            packed.update(r.tensors)
            records += r.records
            distance.update(r.distance)
        tokens = results[0].tokens
        if any(r.tokens != tokens for r in results):
            raise RuntimeError("workers disagree on the routing counts: replay is not deterministic here")

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

        errs = [r for r in records if r["path"] != "gptq"]
        err_g = [r["err_gptq"] for r in records if r["err_gptq"] is not None]
        err_r = [r["err_rtn"] for r in records if r["err_rtn"] is not None]
        summary = {
            "out": str(out), "arch": spec.arch, "experts": spec.n_experts, "tensors": len(records),
            "rows": rows, "replay": job.replay, "workers": len(tasks), "ray": use_ray,
            "err_gptq_mean": sum(err_g) / len(err_g) if err_g else None,
            "err_rtn_mean": sum(err_r) / len(err_r) if err_r else None,
            "under_covered": sum(t < job.min_tokens for t in tokens),
            "not_gptq": len(errs), "seconds_total": 0.0,
            "timings": timings,             # phase → seconds (same dict as the manifest's)
        }
        manifest = {
            "format": "requant.quantize/1",
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "versions": _versions() | ({"ray": ray_info["ray"]} if ray_info else {}),
            "job": asdict(job),
            "spec": asdict(spec),
            "inputs": inputs,
            "stores": stores,
            "replay": job.replay,
            "w2_weighting": job.w2_weighting,
            "gptq": {"damp": job.damp, "act_order": job.act_order, "block_size": gptq.block_size,
                     "group_size": gptq.spec.group_size, "num_bits": gptq.spec.num_bits, "symmetric": True,
                     "batch": batch, "damp_growth": gptq.damp_growth, "damp_max": gptq.damp_max},
            "tokens_per_expert": tokens,
            "tokens_per_expert_identity": results[0].tokens_identity,
            "hessian_distance": {str(e): list(v) for e, v in sorted(distance.items())} or None,
            "tensors": records,
            "errors": [{"tensor": r["name"], "path": r["path"], "tokens": r["tokens"]} for r in errs],
            "slices": [{"index": r.index, "experts": [r.experts[0], r.experts[-1]], "device": r.device,
                        "pid": r.pid, "rows": r.rows, "seconds": r.seconds} for r in results],
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
            _fsync_tree(tmp)
        if out.exists():
            raise FileExistsError(f"output {out} appeared while quantising; result left unpublished")
        os.rename(tmp, out)
        tmp = None
        if job.durable:
            fsync_dir(out.parent)
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


def format_summary(s: dict) -> str:
    g = "—" if s["err_gptq_mean"] is None else f"{s['err_gptq_mean']:.3e}"
    r = "—" if s["err_rtn_mean"] is None else f"{s['err_rtn_mean']:.3e}"
    return (f"{s['out']}: {s['tensors']} tensors of {s['experts']} {s['arch'].upper()} MTP experts, "
            f"{s['rows']:,} rows replayed ({s['replay']}), {s['workers']} worker(s){' on Ray' if s['ray'] else ''}, "
            f"mean rel. output error GPTQ {g} vs RTN {r}, {s['under_covered']} under-covered expert(s), "
            f"{s['not_gptq']} tensor(s) off the GPTQ path, {s['seconds_total']:.1f} s")

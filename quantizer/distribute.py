"""Expert-parallel Hessians + GPTQ: worker g owns a slice of the routed experts, streams the
capture stores through the MTP block (``replay.accumulate_hessians(experts=slice)``), keeps
only its experts' Hessians and runs GPTQ for them on the same device.

Bit-identical whatever the number of workers: every worker replays every row in store
order (routing is computed for all rows, only owned experts' Hessians are kept), and GPTQ
runs over a fixed *plan* of expert batches — slices are unions of whole batches — so each
batched factorisation / GEMM sees the same operands whether one process or eight run it.
On CPU each slice also runs with the same thread count.

Ray: one task per slice (``num_gpus=1`` when the cluster has GPUs), retried when its worker
dies (``max_retries``); a retried slice recomputes the same numbers. Without Ray the same
``quantize_slice`` runs in this process, slice after slice (``run_local``), or in one spawned
process per slice, GPU g each (``run_processes``: one host, no Ray installed).

Replay is replicated, not split: each worker reads every row (its Hessians need all rows
routed to its experts), so N workers divide the Hessian and GPTQ work, not the store reading.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .experts import ExpertQuantConfig, quantize_experts
from .gptq import GPTQConfig
from .limits import MAX_BYTES, MAX_ROWS
from .replay import ReplayConfig, accumulate_hessians

# Test hook: "<marker path>:<slice index>" makes that slice's first attempt kill its process
# (os._exit) after the replay, leaving the marker so the retry runs through.
KILL_ENV = "REQUANT_TEST_KILL_SLICE"


def plan_batches(n_experts: int, batch: int) -> list[list[int]]:
    """Experts in GPTQ batches of ``batch`` consecutive ids (the last may be shorter)."""
    if batch < 1:
        raise ValueError(f"GPTQ batch size must be ≥ 1, got {batch}")
    return [list(range(s, min(s + batch, n_experts))) for s in range(0, n_experts, batch)]


def plan_slices(n_experts: int, batch: int, workers: int) -> list[list[int]]:
    """Contiguous expert slices made of whole batches, as even as the batches allow;
    never more slices than batches (an idle worker gets nothing)."""
    batches = plan_batches(n_experts, batch)
    workers = max(1, min(workers, len(batches)))
    out = []
    for g in range(workers):
        lo, hi = g * len(batches) // workers, (g + 1) * len(batches) // workers
        out.append([e for b in batches[lo:hi] for e in b])
    return out


def gptq_batch_size(n_experts: int, hidden: int, inter: int, device: str) -> int:
    """GPTQ batch from the device's *total* memory (the same on every GPU of a host, unlike
    free memory) after the Hessians and bf16 weights of ALL experts (one worker's worst case):
    w1+w3 entries [2I, D] dominate. It depends on neither the worker count nor the slice, so
    the batch plan — and the shard — are the same for 1, 2 or 8 workers."""
    if not device.startswith("cuda"):
        return 4
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    resident = 4 * n_experts * (hidden * hidden + inter * inter)       # fp32 Hessians
    resident += 2 * n_experts * 3 * inter * hidden                    # bf16 expert weights
    per_entry = 4 * (6 * 2 * inter * hidden + 4 * hidden * hidden)   # quantize_experts' estimate
    free = 0.85 * total - resident - (4 << 30)                        # block, reader, CUDA context
    return max(1, min(n_experts, int(0.6 * free // per_entry)))


@dataclass(frozen=True)
class SliceTask:
    index: int
    experts: list[int]
    master: str
    embed_from: str | None
    stores: list[str]
    replay: str                      # identity | full | both (quantise with full)
    w2_weighting: str = "none"
    max_bytes: int = MAX_BYTES       # replay's host memory bound
    max_rows: int | None = MAX_ROWS  # rows per block call (device memory)
    device: str | None = None        # None: cuda if visible else cpu
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    batch: int = 4
    threads: int | None = None       # CPU: torch threads (same in every worker → same sums)
    kill_marker: str | None = None   # test hook, see KILL_ENV


@dataclass
class SliceResult:
    index: int
    experts: list[int]
    tensors: dict[str, torch.Tensor]           # packed, CPU, keyed by checkpoint name
    records: list[dict]                        # TensorRecord.as_dict(), expert order
    tokens: list[int]                          # [n_experts] routed tokens (quantising mode)
    tokens_identity: list[int] | None          # replay=both: identity routing's counts
    distance: dict[int, tuple[float, float]]   # replay=both: expert → (rel. Frobenius h_in, h_mid)
    rows: int
    seconds: dict[str, float]
    device: str
    pid: int


def _rel_frobenius(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖A − B‖_F / ‖A‖_F per expert (A the reference; 0/0 → 0, x/0 → inf)."""
    a = a.to(b.device)
    num = (a - b).flatten(1).norm(dim=1).double()
    den = a.flatten(1).norm(dim=1).double()
    out = num / den.clamp(min=1e-300)
    out[(den == 0) & (num == 0)] = 0.0
    out[(den == 0) & (num > 0)] = float("inf")
    return out.cpu()


def _distances(full, ident, chunk: int = 16) -> torch.Tensor:
    """Relative Frobenius distance of the mean Hessians (what GPTQ uses), a few experts at a
    time (a full copy of DSV4's input Hessians is 17 GB)."""
    n = len(full.experts)
    return torch.cat([_rel_frobenius(full.mean(list(range(s, min(s + chunk, n)))),
                                     ident.mean(list(range(s, min(s + chunk, n)))))
                      for s in range(0, n, chunk)])


def quantize_slice(task: SliceTask, progress: Callable[[str, int], None] | None = None) -> SliceResult:
    """Replay + Hessians + GPTQ for one slice of experts. ``progress(phase, n)``: rows
    replayed ("rows") and tensors quantised ("tensors")."""
    from .arch import load_block

    threads = torch.get_num_threads()
    if task.threads:
        torch.set_num_threads(task.threads)
    try:
        dev = task.device or ("cuda" if torch.cuda.is_available() else "cpu")
        secs: dict[str, float] = {}
        t0 = time.perf_counter()
        block = load_block(task.master, device=dev, embed_from=task.embed_from)
        secs["load"] = time.perf_counter() - t0
        rows_cb = (lambda n: progress("rows", n)) if progress else None
        mode = "full" if task.replay in ("full", "both") else "identity"
        res = accumulate_hessians(block, task.stores, ReplayConfig(mode=mode, w2_weighting=task.w2_weighting,
                                                                   max_bytes=task.max_bytes, max_rows=task.max_rows,
                                                                   device=dev),
                                  experts=task.experts, progress=rows_cb)
        secs[f"replay_{mode}"] = res.seconds
        distance: dict[int, tuple[float, float]] = {}
        tokens_identity = None
        if task.replay == "both":
            t0 = time.perf_counter()
            if _must_park(res, dev):  # room on the GPU for the second set (DSV4: 21.5 GB each)
                res.h_in.h, res.h_mid.h = res.h_in.h.cpu(), res.h_mid.h.cpu()
            secs["park"] = time.perf_counter() - t0
            ident = accumulate_hessians(block, task.stores, ReplayConfig(mode="identity", w2_weighting=task.w2_weighting,
                                                                         max_bytes=task.max_bytes,
                                                                         max_rows=task.max_rows, device=dev),
                                        experts=task.experts, progress=rows_cb)
            secs["replay_identity"] = ident.seconds
            tokens_identity = ident.tokens_per_expert.tolist()
            t0 = time.perf_counter()
            # The replay's activations are gone: both sets fit on the GPU again; the distances run there.
            res.h_in.h, res.h_mid.h = res.h_in.h.to(dev), res.h_mid.h.to(dev)
            d_in, d_mid = _distances(res.h_in, ident.h_in), _distances(res.h_mid, ident.h_mid)
            distance = {e: (float(d_in[i]), float(d_mid[i])) for i, e in enumerate(task.experts)}
            del ident
            secs["distance"] = time.perf_counter() - t0
        _maybe_die(task)
        t0 = time.perf_counter()
        w1, w2, w3, rows = _weights_for_gptq(block, task.experts, dev)
        cfg = ExpertQuantConfig(gptq=task.gptq, name_fn=block.spec.expert_name, batch_size=task.batch, device=dev)
        tensors, records = quantize_experts(w1, w2, w3, res.h_in, res.h_mid, cfg, rows=rows,
                                            progress=(lambda n: progress("tensors", n)) if progress else None)
        del w1, w2, w3
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        secs["gptq"] = time.perf_counter() - t0
        return SliceResult(task.index, list(task.experts), tensors, [r.as_dict() for r in records],
                           res.tokens_per_expert.tolist(), tokens_identity, distance, res.rows, secs,
                           _device_name(dev), os.getpid())
    finally:
        torch.set_num_threads(threads)


# Device memory the identity pass needs besides its Hessians: the block's activations at
# 16,384 rows per call (DSV4-Flash shapes: ~18 GiB measured) and a margin.
REPLAY_HEADROOM = 24 << 30


def _must_park(res, dev: str) -> bool:
    """Whether the full-mode Hessians must leave the GPU while the identity pass runs:
    only when a second set plus the replay's headroom does not fit (an H100 with DSV4's
    2 × 21.5 GB). An H200 keeps both: the DSV4-Flash stage with replay=both took 45.7 s
    parking, 26.9 s not."""
    if not dev.startswith("cuda"):
        return False
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(torch.device(dev))
    need = res.h_in.h.numel() * res.h_in.h.element_size() + res.h_mid.h.numel() * res.h_mid.h.element_size()
    return free < need + REPLAY_HEADROOM


def _weights_for_gptq(block, experts: list[int], dev: str):
    """(w1, w2, w3, rows) for quantize_experts. On a GPU the slice's experts are handed over
    on the device, in bf16 (load_block put the stacks there), so GPTQ gathers its batches on
    the device instead of copying each one from pageable host memory (converting there to fp32
    first, which doubles the bytes)."""
    w1, w2, w3 = block.expert_weights()
    if not dev.startswith("cuda"):
        return w1, w2, w3, None

    def mine(w: torch.Tensor) -> torch.Tensor:
        return w if len(experts) == w.shape[0] else w.index_select(0, torch.as_tensor(experts, device=w.device))
    return (*(mine(w).to(dev) for w in (w1, w2, w3)), {e: i for i, e in enumerate(experts)})


def _device_name(dev: str) -> str:
    if dev.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(dev))
    return "cpu"


def _maybe_die(task: SliceTask) -> None:
    if not task.kill_marker:
        return
    path, _, index = task.kill_marker.rpartition(":")
    if int(index) == task.index and not Path(path).exists():
        Path(path).write_text(str(os.getpid()))
        os._exit(17)  # a worker lost mid-run: no exception, no cleanup


def run_local(tasks: list[SliceTask], progress: Callable[[str, int], None] | None = None) -> list[SliceResult]:
    """All slices in this process, one after the other (same code as a Ray worker)."""
    return [quantize_slice(t, progress) for t in tasks]


def run_processes(tasks: list[SliceTask], gpus: int = 0, max_retries: int = 2,
                  progress: Callable[[str, int], None] | None = None) -> list[SliceResult]:
    """One spawned process per slice (no Ray: for a single host, and where Ray cannot be
    installed); with ``gpus`` ≥ 1, slice g runs alone on GPU g % gpus (CUDA_VISIBLE_DEVICES).
    A process that dies without a result is started again (up to ``max_retries``), as Ray
    would. Results come back through torch's shared-memory queue, one buffer per slice."""
    import queue as queue_mod

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue, done = ctx.Queue(), ctx.Event()

    def start(t: SliceTask):
        dev = str(t.index % gpus) if gpus else None
        p = ctx.Process(target=_process_main, args=(_with(t, device="cuda" if gpus else t.device), dev, queue, done))
        p.start()
        return p

    procs = {t.index: start(t) for t in tasks}
    retries = {t.index: 0 for t in tasks}
    stale = []
    results: dict[int, SliceResult] = {}
    try:
        while len(results) < len(tasks):
            try:
                index, res, err = queue.get(timeout=2)
            except queue_mod.Empty:  # nothing yet: restart workers that died without a result
                for t in tasks:
                    p = procs[t.index]
                    if t.index in results or p.exitcode in (None, 0):
                        continue
                    if retries[t.index] >= max_retries:
                        raise RuntimeError(f"slice {t.index} worker died {retries[t.index] + 1} times "
                                           f"(last exit code {p.exitcode})") from None
                    retries[t.index] += 1
                    stale.append(p)
                    procs[t.index] = start(t)
                continue
            if err is not None:
                raise err
            results[index] = res
            if progress:
                progress("rows", res.rows)
                progress("tensors", len(res.records))
        out = [results[t.index] for t in tasks]
        for r in out:
            r.tensors = _unflatten(r.tensors)
        return out
    finally:
        done.set()
        for p in [*procs.values(), *stale]:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()


def _flatten(tensors: dict[str, torch.Tensor]) -> dict:
    names = sorted(tensors)
    parts = [tensors[n].contiguous().reshape(-1).view(torch.uint8) for n in names]
    meta = [(n, tensors[n].dtype, tuple(tensors[n].shape), p.numel()) for n, p in zip(names, parts)]
    return {"meta": meta, "data": torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)}


def _unflatten(flat: dict) -> dict[str, torch.Tensor]:
    out, off = {}, 0
    for n, dtype, shape, nbytes in flat["meta"]:
        out[n] = flat["data"][off:off + nbytes].view(dtype).reshape(shape)
        off += nbytes
    return out


def _process_main(task: SliceTask, visible: str | None, queue, done) -> None:
    if visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible  # before CUDA initialises in this process
    try:
        res = quantize_slice(task)
        res.tensors = _flatten(res.tensors)  # one shared-memory buffer, not thousands of fds
        queue.put((task.index, res, None))
    except Exception as e:  # an input error: hand it to the parent as such
        queue.put((task.index, None, e))
    done.wait()


def run_ray(tasks: list[SliceTask], max_retries: int = 2,
            progress: Callable[[str, int], None] | None = None) -> tuple[list[SliceResult], dict]:
    """One Ray task per slice on the cluster at ``RAY_ADDRESS`` (else a local one started
    here and shut down after). Returns results in slice order and cluster facts."""
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True)
        started = True
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        opts = {"num_gpus": 1} if gpus >= 1 else {"num_cpus": 1}
        remote = ray.remote(max_retries=max_retries, **opts)(_ray_slice)
        if gpus >= 1:  # the worker sees its one GPU as cuda:0 (Ray sets CUDA_VISIBLE_DEVICES)
            tasks = [_with(t, device="cuda") for t in tasks]
        refs = [remote.remote(t) for t in tasks]
        try:
            results = ray.get(refs)
            for r in results:  # out of the (read-only) object store into our own memory
                r.tensors = _unflatten({"meta": r.tensors["meta"], "data": torch.from_numpy(r.tensors["data"].copy())})
        except ray.exceptions.RayTaskError as e:  # an input error inside a worker: raise it as such
            cause = getattr(e, "cause", None)
            raise (cause if isinstance(cause, Exception) else e) from None
        if progress:
            for r in results:
                progress("rows", r.rows)
                progress("tensors", len(r.records))
        return results, {"ray": ray.__version__, "gpus": gpus, "address": os.environ.get("RAY_ADDRESS") or "local"}
    finally:
        if started:
            ray.shutdown()


def _ray_slice(task: SliceTask) -> SliceResult:
    res = quantize_slice(task)
    flat = _flatten(res.tensors)
    flat["data"] = flat["data"].numpy()  # Ray's object store takes numpy without pickling a copy
    res.tensors = flat
    return res


def _with(task: SliceTask, **changes) -> SliceTask:
    from dataclasses import replace

    return replace(task, **changes)

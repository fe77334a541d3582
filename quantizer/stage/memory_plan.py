"""A stage run's per-worker memory: the plan's estimate (``core.memory.estimate``) from the
master's block and the partitions, the limit it must fit, and the manifest's view of both
beside what each worker measured."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from requant.quantizer.core.memory import GIB, Shapes, estimate
from requant.quantizer.mtp.arch import MTPSpec
from requant.quantizer.mtp.weights import read_header
from requant.quantizer.stage.distribute import StageTask
from requant.quantizer.stage.job import QuantizeJob


@dataclass(frozen=True)
class MemoryPlan:
    estimate: dict           # core.memory.estimate: per step bytes and parts, peak, parkable
    limit: int               # bytes per worker
    limit_source: str        # what the limit is, for the refusal's message
    device: str


def block_bytes(spec: MTPSpec, where: dict[str, Path], master_config: dict) -> tuple[int, int]:
    """(bytes of the block's weights as a worker holds them, of which the routed experts): bf16
    stacks of the experts, the MTP's other tensors in bf16 (their FP8 scales consumed), and the
    embedding where the MTP layer has none of its own."""
    experts = 2 * 3 * spec.n_experts * spec.moe_inter * spec.hidden
    heads = {f: read_header(f) for f in {where[n] for n in where if n.startswith(spec.prefix)}}
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


def memory_limit(job: QuantizeJob, device: str) -> tuple[int, str]:
    """The per-worker limit and what it is: the job's, the GPU's memory, or this host's shared
    among the workers."""
    if job.memory_limit is not None:
        return job.memory_limit, "memory_limit"
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return props.total_memory, f"{props.name}'s memory"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // job.workers, (f"this host's {total / GIB:.1f} GiB" + (f" / {job.workers} workers"
                                                                        if job.workers > 1 else ""))


def plan_memory(job: QuantizeJob, spec: MTPSpec, where: dict[str, Path], master_config: dict,
                task: StageTask, device: str) -> MemoryPlan:
    """The per-worker memory estimate of this plan and the limit."""
    block, experts = block_bytes(spec, where, master_config)
    largest = max(p.rows for ph in task.phases for p in task.plan.parts(ph.split))
    per_call = min(job.max_rows or largest, largest)
    own = max(len(sl) for sl in task.slices)
    row_bytes = 2 * spec.hc_mult * spec.hidden + 24
    est = estimate(Shapes(spec.n_experts, spec.hidden, spec.moe_inter, spec.topk, block, experts),
                   [(p.split, p.mode) for p in task.phases],
                   accumulate=spec.n_experts if task.parallel == "data" else own, own=own, batch=task.batch,
                   rows_per_call=per_call, window_rows=min(largest, max(job.fold_rows, per_call)),
                   gptq_batch=task.batch, device=device,
                   host_rows_bytes=min(job.max_bytes, 2 * largest * row_bytes))
    limit, source = memory_limit(job, device)
    return MemoryPlan(est, limit, source, device)


def memory_facts(memory: MemoryPlan, results: list) -> dict:
    """The manifest's memory section: the estimate per step, the limit, and each worker's
    measured peak per step (device: ``torch.cuda.max_memory_allocated``; host: peak RSS)."""
    est = memory.estimate
    kind = "device" if memory.device.startswith("cuda") else "host"
    measured = [{"rank": r.rank, "steps": r.memory} for r in results]
    peaks = [max((m.get(kind, m.get(f"{kind}_lifetime", 0)) for m in r.memory.values()), default=0) for r in results]
    return {"limit": memory.limit, "limit_source": memory.limit_source, "measured_kind": kind,
            "estimate": {"peak": est["peak"], "peak_step": est["peak_step"],
                         "steps": {k: v["bytes"] for k, v in est["steps"].items()},
                         "parts": {k: v["parts"] for k, v in est["steps"].items()}},
            "peak_per_worker": peaks, "workers": measured}

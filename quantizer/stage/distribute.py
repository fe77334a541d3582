"""Data-parallel replay, exact Hessian reduction, expert-parallel GPTQ.

W workers (ranks 0 … W-1). Each owns a contiguous slice of the routed experts made of whole
GPTQ batches (``plan_slices``) and, in every replay *phase* (a split of the partition plan ×
a replay mode, ``phases_for``), a contiguous share of that split's partitions
(``partition.assign``). A worker reads and replays only its partitions, folding each into
int64 fixed-point sums of all experts' Hessians (``replay.replay_partitions``); the sums are
then reduced to each chunk's owner with a real collective — ``torch.distributed.reduce``
(SUM) per GPTQ batch, NCCL on GPUs, gloo on CPUs — and the owner turns its slice back into
fp32 Hessians. Integer addition is associative, so the reduced sums, and the shard, are the
same bits for any worker count and any assignment of partitions to workers (on CPUs every
worker also runs with the same thread count). Memory (``core.memory``): the int64 sums are upper
triangles in blocks of whole GPTQ batches (DSV4-Flash: 21.5 GB, an fp32 set's size) and the
fp32 partial one chunk of experts (1.3 GB) during replay; the reduce works in place, block by
block, and a worker drops each block it does not own as soon as it is sent; the owner keeps
its blocks as fp32 upper triangles, unpacked a GPTQ batch at a time. Each step's peak
(``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS on the host) is
returned for the manifest.

``parallel="replicated"``: every worker replays every partition but keeps only its own
experts — no collective; the same bits again. It is also how a replacement catches up.

Losing a worker (Ray actor or spawned process dying): while replaying, it is replaced and
its partitions rerun; the replacement first recomputes, alone and for its experts only,
the phases already reduced (their Hessians lived on the lost worker; held-out, the
smallest, runs first). Lost inside a collective, the survivors may be blocked in it: all
workers are stopped and the attempt starts over. Each rank may be lost ``max_retries``
times. A worker's sums refuse partitions of another plan (``replay.replay_partitions``) and
the driver checks that each phase's partitions were folded exactly once before reducing.

This module plans it (``StageTask``: phases, GPTQ batches, expert slices); ``worker`` is one
rank, ``driver`` runs the phases and replaces lost workers, and the workers run in this
process (``local.run_local``), in spawned processes on one host (``processes.run_processes``)
or as Ray actors (``ray_actors.run_ray``); ``wire`` carries their tensors back.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from requant.quantizer.core.experts import LowTokenPolicy
from requant.quantizer.core.gptq import GPTQConfig
from requant.quantizer.core.limits import FOLD_ROWS, MAX_BYTES, MAX_ROWS
from requant.quantizer.core.memory import gptq_entry_bytes
from requant.quantizer.stage.partition import PartitionPlan

# Test hook: "<marker path>:<rank>" makes that rank's first attempt kill its process
# (os._exit) right after it folded its first calibration partition, leaving the marker so
# the replacement runs through.
KILL_ENV = "REQUANT_TEST_KILL_WORKER"
PARALLEL = ("data", "replicated")


def plan_batches(n_experts: int, batch: int) -> list[list[int]]:
    """Experts in GPTQ batches of ``batch`` consecutive ids (the last may be shorter)."""
    if batch < 1:
        raise ValueError(f"GPTQ batch size must be ≥ 1, got {batch}")
    return [list(range(s, min(s + batch, n_experts))) for s in range(0, n_experts, batch)]


def plan_slices(n_experts: int, batch: int, workers: int) -> list[list[int]]:
    """One contiguous expert slice per worker, made of whole batches, as even as the batches
    allow; workers beyond the number of batches get none (they replay and reduce only)."""
    batches = plan_batches(n_experts, batch)
    owners = max(1, min(workers, len(batches)))
    out = []
    for g in range(owners):
        lo, hi = g * len(batches) // owners, (g + 1) * len(batches) // owners
        out.append([e for b in batches[lo:hi] for e in b])
    return out + [[] for _ in range(workers - owners)]


def gptq_batch_size(n_experts: int, hidden: int, inter: int, device: str) -> int:
    """GPTQ batch from the device's *total* memory (the same on every GPU of a host, unlike
    free memory) after the Hessians and bf16 weights of ALL experts (one worker's worst case):
    calibration and held-out packed fp32 Hessians, w1+w3 entries [2I, D] dominate. It depends on
    neither the worker count nor the slice, so the batch plan — and the shard — are the same
    for 1, 2 or 8 workers."""
    if not device.startswith("cuda"):
        return 4
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    # fp32 upper triangles of two passes (calibration, held-out) = one full set (to D+I entries an
    # expert): the same batch as when GPTQ held one full set, so the same shard on GPUs too
    resident = 4 * n_experts * (hidden * hidden + inter * inter)
    resident += 2 * n_experts * 3 * inter * hidden                    # bf16 expert weights
    free = 0.85 * total - resident - (4 << 30)                        # block, reader, CUDA context
    return max(1, min(n_experts, int(0.6 * free // gptq_entry_bytes(hidden, inter))))


@dataclass(frozen=True)
class Phase:
    split: str     # calibration | heldout
    mode: str      # identity | full


def phases_for(replay: str, heldout: bool) -> list[Phase]:
    """Replay passes in order: held-out first (the cheapest for a replacement to redo), with
    ``both`` the identity calibration pass, and last the calibration pass GPTQ uses."""
    mode = "full" if replay in ("full", "both") else "identity"
    out = [Phase("heldout", mode)] if heldout else []
    if replay == "both":
        out.append(Phase("calibration", "identity"))
    return out + [Phase("calibration", mode)]


@dataclass(frozen=True)
class StageTask:
    """What every worker of one stage run gets (rank-independent)."""
    master: str
    embed_from: str | None
    plan: PartitionPlan
    phases: list[Phase]
    slices: list[list[int]]          # experts per rank (whole GPTQ batches; empty beyond the batches)
    batch: int                       # experts per GPTQ batch
    replay: str = "identity"         # identity | full | both (quantise with full)
    parallel: str = "data"           # data | replicated
    w2_weighting: str = "none"
    max_bytes: int = MAX_BYTES       # replay's host memory bound
    max_rows: int | None = MAX_ROWS  # rows per block call (device memory)
    fold_rows: int = FOLD_ROWS       # rows of a partition per fp32 partial
    device: str | None = None        # None: cuda if visible else cpu
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    low_tokens: LowTokenPolicy = field(default_factory=LowTokenPolicy)
    threads: int | None = None       # CPU: torch threads (same in every worker → same sums)
    kill_marker: str | None = None   # test hook, see KILL_ENV

    def __post_init__(self):
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")

    @property
    def world(self) -> int:
        return len(self.slices)

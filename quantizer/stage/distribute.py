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
worker also runs with the same thread count). Memory (``memory.py``): the int64 sums are upper
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

Runners: ``run_local`` (one worker in this process), ``run_processes`` (one spawned process
per worker, GPU g each; one host, no Ray) and ``run_ray`` (one Ray actor per worker, on the
cluster at ``RAY_ADDRESS`` or a local one).
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch

from requant.quantizer.core.experts import ExpertQuantConfig, LowTokenPolicy, quantize_experts
from requant.quantizer.core.gptq import GPTQConfig
from requant.quantizer.core.hessian import pool_shift, pooled_sum
from requant.quantizer.core.limits import FOLD_ROWS, MAX_BYTES, MAX_ROWS
from requant.quantizer.core.memory import gptq_entry_bytes, tri
from requant.quantizer.stage.partition import PartitionPlan, assign

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


@dataclass
class WorkerResult:
    rank: int
    experts: list[int]
    tensors: dict[str, torch.Tensor]           # packed, CPU, keyed by checkpoint name
    records: list[dict]                        # TensorRecord.as_dict() (+ held-out fields), expert order
    tokens: dict[int, list[int]]               # phase → [n_experts] routed tokens (totals)
    distance: dict[int, tuple[float, float]]   # replay=both: expert → (rel. Frobenius h_in, h_mid)
    seconds: dict[str, float]
    device: str
    pid: int
    memory: dict[str, dict[str, int]] = field(default_factory=dict)  # step → {"device", "host"} peak bytes


@dataclass
class RunOutcome:
    results: list[WorkerResult]      # rank order
    steps: list[dict]                # every replay / reduce step's statistics, per rank
    walls: dict[str, float]          # driver wall seconds: "replay <split>/<mode>", "reduce …", "gptq"
    cluster: dict | None = None      # Ray facts


class Worker:
    """One rank's state across the phases: its sums while replaying, then its experts'
    fp32 Hessians per phase, then GPTQ. Runs in this process, a spawned one or a Ray actor."""

    def __init__(self, task: StageTask, rank: int):
        self.task, self.rank = task, rank
        if task.threads:
            torch.set_num_threads(task.threads)
        self.dev = task.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.block = self.reader = None
        self.sums: dict[int, object] = {}                  # phase → replay.PartitionSums
        self.owned: dict[int, tuple] = {}                  # phase → (h_in, h_mid) of this rank's experts
        self.tokens: dict[int, list[int]] = {}
        self.seconds: dict[str, float] = {}
        self.memory: dict[str, dict[str, int]] = {}    # step → peak bytes ("device", "host")
        self._fresh = False

    # -- replay --------------------------------------------------------------------------
    def setup(self) -> dict:
        """Load the block and open the stores (the driver times worker start-up with it)."""
        self._setup()
        return {"rank": self.rank, "pid": os.getpid(), "seconds": self.seconds["load"]}

    def _setup(self) -> None:
        if self.block is None:
            from requant.storage import StoreReader

            from requant.quantizer.mtp.arch import load_block

            t0 = time.perf_counter()
            self._reset()
            self.block = load_block(self.task.master, device=self.dev, embed_from=self.task.embed_from)
            self.reader = StoreReader(list(self.task.plan.stores))
            self.seconds["load"] = time.perf_counter() - t0
            self._peak("load")

    def _reset(self) -> None:
        self._fresh = _peak_reset(self.dev)

    def _peak(self, step: str) -> dict[str, int]:
        """Record this step's peak memory since ``_reset`` (the larger one where a step runs twice)."""
        got = _peak_read(self.dev, self._fresh)
        old = self.memory.get(step, {})
        self.memory[step] = {k: max(v, old.get(k, 0)) for k, v in got.items()}
        return got

    def _cfg(self, mode: str):
        from requant.quantizer.stage.replay import ReplayConfig

        t = self.task
        return ReplayConfig(mode=mode, w2_weighting=t.w2_weighting, max_bytes=t.max_bytes, max_rows=t.max_rows,
                            fold_rows=t.fold_rows, device=self.dev)

    def replay(self, ph: int, parts: list[int], experts: list[int] | None) -> dict:
        """Fold partitions ``parts`` of phase ``ph`` into this rank's sums: of all experts
        (``experts`` None: a data-parallel share) or only of ``experts``."""
        from requant.quantizer.stage.replay import new_sums, replay_partitions

        self._setup()
        phase = self.task.phases[ph]
        self._reset()
        if ph not in self.sums:
            self.sums[ph] = new_sums(self.block, self.task.plan, phase.split, phase.mode, experts, self.dev,
                                     self.task.w2_weighting, batch=self.task.batch)
        before = self.reader.bytes_read
        kill = self._maybe_die if phase.split == "calibration" else None
        sums = replay_partitions(self.block, self.reader, self.task.plan, self.sums[ph], parts, self._cfg(phase.mode),
                                 after_each=kill)
        self.seconds[f"replay_{phase.split}_{phase.mode}"] = sums.seconds
        return {"rank": self.rank, "phase": ph, "split": phase.split, "mode": phase.mode, "partitions": list(parts),
                "rows": sum(self.task.plan.parts(phase.split)[i].rows for i in parts),
                "bytes_read": self.reader.bytes_read - before, "seconds": sums.seconds, "pid": os.getpid(),
                "all_experts": experts is None, "peak": self._peak(f"replay {phase.split}/{phase.mode}")}

    def keep(self, ph: int) -> dict:
        """Sums of this rank's own experts over all partitions (replicated, or catching up)
        become its fp32 Hessians of phase ``ph``."""
        sums = self.sums.pop(ph)
        phase = self.task.phases[ph]
        self._reset()
        self.owned[ph] = (sums.h_in.to_packed(), sums.h_mid.to_packed())
        self.tokens[ph] = sums.tokens.tolist()
        parts = list(sums.partitions)
        del sums
        self._park(ph)
        return {"rank": self.rank, "phase": ph, "partitions": parts,
                "peak": self._peak(f"reduce {phase.split}/{phase.mode}")}

    def _maybe_die(self, _partition: int) -> None:
        if not self.task.kill_marker:
            return
        path, _, rank = self.task.kill_marker.rpartition(":")
        if int(rank) == self.rank and not Path(path).exists():
            Path(path).write_text(str(os.getpid()))
            os._exit(17)  # a worker lost mid-replay: no exception, no cleanup

    # -- reduction -----------------------------------------------------------------------
    def free_port(self) -> tuple[str, int]:
        """An address and a free port on this worker's host for the process group's rendezvous."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        try:
            import ray

            addr = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
        except ImportError:
            addr = "127.0.0.1"
        return addr, port

    def init_group(self, addr: str, port: int) -> None:
        """Join the process group of all ranks for one reduce: NCCL on GPUs, gloo on CPUs."""
        import torch.distributed as dist

        if self.dev.startswith("cuda"):
            torch.cuda.set_device(torch.device(self.dev).index or 0)
        dist.init_process_group("nccl" if self.dev.startswith("cuda") else "gloo", init_method=f"tcp://{addr}:{port}",
                                rank=self.rank, world_size=self.task.world, timeout=timedelta(minutes=30))

    def reduce(self, ph: int) -> dict:
        """Collective: every rank's all-expert sums of phase ``ph`` are summed onto each GPTQ
        batch's owner (``dist.reduce`` per block = batch, in place: no second set); every other
        rank drops the block once sent, the owner keeps its slice as fp32 upper triangles.
        Token counts are all-reduced."""
        import torch.distributed as dist

        t0 = time.perf_counter()
        if ph not in self.sums:
            raise RuntimeError(f"worker {self.rank} holds no sums of phase {ph} to reduce")
        phase = self.task.phases[ph]
        self._reset()
        sums = self.sums.pop(ph)
        owner = {e: r for r, sl in enumerate(self.task.slices) for e in sl}
        if sums.h_in.blocks != [(b[0], b[-1] + 1) for b in plan_batches(len(owner), self.task.batch)]:
            raise RuntimeError("the sums' blocks are not the GPTQ batches: refusing to reduce them")
        nbytes = 0
        for b, (e0, _) in enumerate(sums.h_in.blocks):
            for fp in (sums.h_in, sums.h_mid):
                chunk = fp.q[b]
                dist.reduce(chunk, dst=owner[e0], op=dist.ReduceOp.SUM)
                nbytes += chunk.numel() * chunk.element_size()
                if owner[e0] != self.rank:
                    del chunk
                    fp.drop(b)
        tokens = sums.tokens.to(self.dev)
        dist.all_reduce(tokens, op=dist.ReduceOp.SUM)
        # no group outlives its reduce: a worker lost while replaying never leaves one
        # (an NCCL communicator with a dead peer) for the others to tear down
        dist.destroy_process_group()
        sums.h_in.count = sums.h_mid.count = tokens.cpu()
        mine = self.task.slices[self.rank]
        if mine:  # a rank beyond the GPTQ batches only contributes
            own = slice(mine[0], mine[-1] + 1)
            self.owned[ph] = (sums.h_in.to_packed(own), sums.h_mid.to_packed(own))
        self.tokens[ph] = tokens.cpu().tolist()
        del sums
        self._park(ph)
        secs = time.perf_counter() - t0
        self.seconds[f"reduce_{phase.split}_{phase.mode}"] = secs
        return {"rank": self.rank, "phase": ph, "bytes_reduced": nbytes, "seconds": secs,
                "peak": self._peak(f"reduce {phase.split}/{phase.mode}")}

    def _park(self, ph: int) -> None:
        """Earlier phases' Hessians go to the host when the GPU lacks room for the next
        phase's sums (int64 upper triangles, all experts), fp32 partial and fold window plus
        the replay's activations."""
        if not self.dev.startswith("cuda") or ph == len(self.task.phases) - 1 or ph not in self.owned:
            return
        spec = self.block.spec
        need = 8 * spec.n_experts * (tri(spec.hidden) + tri(spec.moe_inter)) + REPLAY_HEADROOM
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(torch.device(self.dev))
        if free < need:
            for hs in self.owned[ph]:
                hs.to("cpu")

    # -- GPTQ ----------------------------------------------------------------------------
    def pooled_part(self) -> dict:
        """This rank's share of the pooled Hessians of the last phase (what ``shrink`` pulls toward):
        Σ over its experts on grids every rank shares (``hessian.pooled_sum``), int64 on the CPU, with
        those grids and the phase's routed tokens of all experts."""
        self._setup()
        last = len(self.task.phases) - 1
        shifts = pool_shifts(self.block, self.task.plan.rows("calibration"), self.task.w2_weighting)
        parts = tuple(pooled_sum(h, sh).cpu() for h, sh in zip(self.owned[last], shifts))
        return {"parts": parts, "shifts": shifts, "tokens": sum(self.tokens[last])}

    def quantize(self, pooled: tuple[torch.Tensor, torch.Tensor] | None = None) -> WorkerResult:
        """GPTQ of this rank's experts from the last phase's Hessians; the identity-vs-full
        distance (replay=both) and the held-out errors where those phases ran. ``pooled``: the
        pooled mean Hessians of all experts (``pooled_means``), for the shrink policy."""
        from requant.quantizer.core.heldout import heldout_records

        self._setup()
        task, experts = self.task, self.task.slices[self.rank]
        if not experts:  # more workers than GPTQ batches: this one only replayed
            return WorkerResult(self.rank, [], {}, [], self.tokens, {}, dict(self.seconds), _device_name(self.dev),
                                os.getpid(), dict(self.memory))
        last = len(task.phases) - 1
        self._reset()
        h_in, h_mid = self.owned[last]
        h_in.to(self.dev)
        h_mid.to(self.dev)
        distance: dict[int, tuple[float, float]] = {}
        ident = [i for i, p in enumerate(task.phases) if p.split == "calibration" and i != last]
        if ident:
            t0 = time.perf_counter()
            i_in, i_mid = self.owned[ident[0]]
            d_in, d_mid = _distances(h_in, i_in), _distances(h_mid, i_mid)
            distance = {e: (float(d_in[i]), float(d_mid[i])) for i, e in enumerate(experts)}
            del self.owned[ident[0]], i_in, i_mid
            self.seconds["distance"] = time.perf_counter() - t0
        held = [i for i, p in enumerate(task.phases) if p.split == "heldout"]
        t0 = time.perf_counter()
        w1, w2, w3, rows = _weights_for_gptq(self.block, experts, self.dev)
        cfg = ExpertQuantConfig(gptq=task.gptq, name_fn=self.block.spec.expert_name, batch_size=task.batch,
                                device=self.dev, low_tokens=task.low_tokens)
        if pooled is not None:
            pooled = tuple(p.to(self.dev) for p in pooled)
        tensors, records = quantize_experts(w1, w2, w3, h_in, h_mid, cfg, rows=rows, pooled=pooled)
        if self.dev.startswith("cuda"):
            torch.cuda.synchronize()
        self.seconds["gptq"] = time.perf_counter() - t0
        out = [r.as_dict() for r in records]
        if held:
            t0 = time.perf_counter()
            ho_in, ho_mid = self.owned[held[0]]
            ho = heldout_records(w1, w2, w3, tensors, ho_in, ho_mid, self.block.spec.expert_name, rows=rows,
                                 batch=task.batch, device=self.dev, spec=task.gptq.spec)
            out = [r | ho[(r["expert"], r["proj"])] for r in out]
            self.seconds["heldout_errors"] = time.perf_counter() - t0
        self._peak("gptq")
        return WorkerResult(self.rank, list(experts), tensors, out, self.tokens, distance, dict(self.seconds),
                            _device_name(self.dev), os.getpid(), dict(self.memory))


def pool_shifts(block, rows: int, w2_weighting: str = "none") -> tuple[int, int]:
    """Grids (``hessian.pool_shift``) of the pooled input and intermediate Hessians of ``rows`` rows."""
    from requant.quantizer.stage.replay import row_bounds

    b_in, b_mid = row_bounds(block, w2_weighting)
    return pool_shift(b_in, rows), pool_shift(b_mid, rows)


def pooled_means(parts: list[tuple[torch.Tensor, torch.Tensor]], shifts: tuple[int, int],
                 tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_e H_e / Σ_e T_e over all experts (fp32) from the ranks' ``pooled_part`` shares: an integer sum,
    so the same bits for any worker count — in the stage a 1-worker run pools the same way."""
    out = []
    for i, sh in enumerate(shifts):
        total = torch.stack([p[i] for p in parts]).sum(0)
        out.append((torch.ldexp(total.double(), torch.tensor(float(-sh), dtype=torch.float64)) / max(tokens, 1)).float())
    return out[0], out[1]


# Device memory the replay needs besides its Hessians: the block's activations at 16,384
# rows per call (DSV4-Flash shapes: ~18 GiB measured) and a margin.
REPLAY_HEADROOM = 24 << 30


def _peak_reset(dev: str) -> bool:
    """Restart the peak counters: the allocator's on a GPU, and the process's peak RSS (VmHWM,
    Linux ``clear_refs`` 5) — False where that cannot be reset."""
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(dev))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_read(dev: str, fresh: bool) -> dict[str, int]:
    """Peak bytes since ``_peak_reset``: "device" (allocated by torch on the GPU) and "host"
    (peak RSS; "host_lifetime", the process's whole life, where it was not reset)."""
    out = {}
    if dev.startswith("cuda"):
        out["device"] = int(torch.cuda.max_memory_allocated(torch.device(dev)))
    host = 0
    try:
        with open("/proc/self/status") as f:
            host = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0)
    except OSError:
        pass
    if not host:
        import resource

        host, fresh = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, False
    out["host" if fresh else "host_lifetime"] = host
    return out


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
                                     ident.mean(list(range(s, min(s + chunk, n)))).to(full.device))
                      for s in range(0, n, chunk)])


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


# -- the driver (runner-independent) ------------------------------------------------------------

class WorkerLost(Exception):
    def __init__(self, ranks: list[int]):
        super().__init__(f"worker(s) {ranks} lost")
        self.ranks = ranks


class _LostInCollective(Exception):
    pass


def _drive(pool, task: StageTask, max_retries: int, progress: Callable[[str, int], None] | None) -> RunOutcome:
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


def _attempt(pool, task: StageTask, lost_count: list[int], max_retries: int, progress) -> RunOutcome:
    W, plan = task.world, task.plan
    steps: list[dict] = []
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
                    steps.append(pool.call(r, "replay", q, parts, task.slices[r]) | {"catch_up": True})
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
                progress("rows", st["rows"])
        walls[f"replay {name}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if task.parallel == "replicated":
            run_step({r: ("keep", ph) for r in calls})
        else:
            folded = sorted(i for st in steps if st["phase"] == ph and st["all_experts"] for i in st["partitions"])
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
        if len({(p["shifts"], p["tokens"]) for p in parts.values()}) != 1:
            raise RuntimeError("workers disagree on the pooled Hessian's grid or token count")
        first = next(iter(parts.values()))
        pooled = pooled_means([p["parts"] for p in parts.values()], first["shifts"], first["tokens"])
    results = run_step({r: ("quantize", pooled) for r in range(W)})
    walls["gptq"] = time.perf_counter() - t0
    return RunOutcome([results[r] for r in range(W)], steps, walls)


class _LocalPool:
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
        return _drive(_LocalPool(task), task, 0, progress)
    finally:
        torch.set_num_threads(threads)


# -- spawned processes ------------------------------------------------------------------------

class _ProcessPool:
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

    def call(self, r: int, method: str, *args):
        out, lost = self.run({r: (method, *args)})
        if lost:
            raise WorkerLost(lost)
        return out[r]

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
                res.tensors = _unflatten(res.tensors)
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
                res.tensors = _flatten(res.tensors)  # one shared-memory buffer, not thousands of fds
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
        return _drive(pool, task, max_retries, progress)
    finally:
        pool.close()


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


# -- Ray ----------------------------------------------------------------------------------------

class _RayWorker(Worker):
    """The Ray actor: results leave as numpy (the object store takes it without a pickled copy)."""

    def quantize(self, pooled: tuple[torch.Tensor, torch.Tensor] | None = None) -> WorkerResult:
        res = super().quantize(pooled)
        flat = _flatten(res.tensors)
        flat["data"] = flat["data"].numpy()
        res.tensors = flat
        return res


class _RayPool:
    """One Ray actor per rank (``max_restarts=0``: an actor Ray restarted would come back
    empty, so the driver replaces lost ones itself)."""

    def __init__(self, task: StageTask, opts: dict):
        import ray

        self.ray, self.task = ray, task
        self.cls = ray.remote(max_restarts=0, max_task_retries=0, **opts)(_RayWorker)
        self.actors: dict[int, object] = {}
        for r in range(task.world):
            self.restart(r)

    def restart(self, r: int) -> None:
        if r in self.actors:
            self.ray.kill(self.actors[r], no_restart=True)
        self.actors[r] = self.cls.remote(self.task, r)

    def call(self, r: int, method: str, *args):
        out, lost = self.run({r: (method, *args)})
        if lost:
            raise WorkerLost(lost)
        return out[r]

    def run(self, calls: dict, collective: bool = False) -> tuple[dict, list[int]]:
        ray = self.ray
        refs = {getattr(self.actors[r], m).remote(*a): r for r, (m, *a) in calls.items()}
        done, lost = {}, []
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            r = refs.pop(ready[0])
            try:
                res = ray.get(ready[0])
            except ray.exceptions.RayActorError:
                lost.append(r)
                if collective:  # the others may wait for it inside the collective
                    return done, lost
                continue
            except ray.exceptions.RayTaskError as e:  # an input error inside a worker: raise it as such
                cause = getattr(e, "cause", None)
                raise (cause if isinstance(cause, Exception) else e) from None
            if isinstance(res, WorkerResult):  # out of the (read-only) object store into our memory
                res.tensors = _unflatten({"meta": res.tensors["meta"],
                                          "data": torch.from_numpy(res.tensors["data"].copy())})
            done[r] = res
        return done, lost

    def close(self) -> None:
        for a in self.actors.values():
            self.ray.kill(a, no_restart=True)


def run_ray(task: StageTask, max_retries: int = 2, progress: Callable[[str, int], None] | None = None) -> RunOutcome:
    """One Ray actor per worker on the cluster at ``RAY_ADDRESS`` (else a local one started
    here and shut down after)."""
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True)
        started = True
    try:
        res = ray.cluster_resources()
        gpus, cpus = res.get("GPU", 0), res.get("CPU", 1)
        if gpus >= 1:  # the actor sees its one GPU as cuda:0 (Ray sets CUDA_VISIBLE_DEVICES)
            if task.world > gpus:
                raise ValueError(f"{task.world} workers need {task.world} GPUs at once (they reduce together); "
                                 f"the Ray cluster has {gpus:g}")
            opts = {"num_gpus": 1}
            task = replace(task, device="cuda")
        else:  # all actors must be up at once: share the CPUs rather than queue
            opts = {"num_cpus": min(1.0, cpus / task.world)}
        pool = _RayPool(task, opts)
        try:
            out = _drive(pool, task, max_retries, progress)
        finally:
            pool.close()
        out.cluster = {"ray": ray.__version__, "gpus": gpus, "address": os.environ.get("RAY_ADDRESS") or "local"}
        return out
    finally:
        if started:
            ray.shutdown()

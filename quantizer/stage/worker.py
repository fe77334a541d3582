"""One rank of the stage (``distribute``'s docstring: the scheme): its sums while replaying,
its experts' fp32 Hessians after the reduce, then GPTQ and the held-out errors, and each
step's peak memory. The same class runs in this process, a spawned one or a Ray actor."""
from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import torch

from requant.quantizer.core.experts import ExpertQuantConfig, quantize_experts
from requant.quantizer.core.hessian import pool_shift, pooled_sum
from requant.quantizer.core.memory import tri
from requant.quantizer.stage.distribute import StageTask, plan_batches
from requant.quantizer.stage.records import (HeldoutErrors, PooledPart, ReduceStep, ReplayStep, TensorResult,
                                             WorkerResult)


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
    def setup(self) -> None:
        """Load the block and open the stores (the driver times worker start-up with it)."""
        self._setup()

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

    def replay(self, ph: int, parts: list[int], experts: list[int] | None) -> ReplayStep:
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
        return ReplayStep(self.rank, ph, phase.split, phase.mode, list(parts),
                          rows=sum(self.task.plan.parts(phase.split)[i].rows for i in parts),
                          bytes_read=self.reader.bytes_read - before, seconds=sums.seconds, pid=os.getpid(),
                          all_experts=experts is None, peak=self._peak(f"replay {phase.split}/{phase.mode}"))

    def keep(self, ph: int) -> None:
        """Sums of this rank's own experts over all partitions (replicated, or catching up)
        become its fp32 Hessians of phase ``ph``."""
        sums = self.sums.pop(ph)
        phase = self.task.phases[ph]
        self._reset()
        self.owned[ph] = (sums.h_in.to_packed(), sums.h_mid.to_packed())
        self.tokens[ph] = sums.tokens.tolist()
        del sums
        self._park(ph)
        self._peak(f"reduce {phase.split}/{phase.mode}")

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

    def reduce(self, ph: int) -> ReduceStep:
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
        return ReduceStep(self.rank, ph, nbytes, secs, self._peak(f"reduce {phase.split}/{phase.mode}"))

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
    def pooled_part(self) -> PooledPart:
        """This rank's share of the pooled Hessians of the last phase (what ``shrink`` pulls toward):
        Σ over its experts on grids every rank shares (``hessian.pooled_sum``), int64 on the CPU, with
        those grids and the phase's routed tokens of all experts."""
        self._setup()
        last = len(self.task.phases) - 1
        shifts = pool_shifts(self.block, self.task.plan.rows("calibration"), self.task.w2_weighting)
        parts = tuple(pooled_sum(h, sh).cpu() for h, sh in zip(self.owned[last], shifts))
        return PooledPart(parts, shifts, sum(self.tokens[last]))

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
        out = [TensorResult(r) for r in records]
        if held:
            t0 = time.perf_counter()
            ho_in, ho_mid = self.owned[held[0]]
            ho = heldout_records(w1, w2, w3, tensors, ho_in, ho_mid, self.block.spec.expert_name, rows=rows,
                                 batch=task.batch, device=self.dev, spec=task.gptq.spec)
            for r in out:
                r.heldout = HeldoutErrors(**ho[(r.record.expert, r.record.proj)])
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
# rows per call (DSV4-Flash shapes: ``core.memory.ACT_BYTES``) and a margin.
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

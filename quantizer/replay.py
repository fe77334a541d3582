"""Replay capture stores through an MTP block into per-expert GPTQ Hessians.

For every store row the block rebuilds the MTP inputs (previous states + embedding of the
next token) and runs up to the routed experts (``MTPBlock.moe_inputs``); the gate's top-k
picks which experts see the row. Per expert e with rows S_e:

* ``h_in[e]  = Σ_{t∈S_e} x_t x_tᵀ``  — input of w1 and w3 (the MoE input, [H]).
* ``h_mid[e] = Σ_{t∈S_e} a_t a_tᵀ``  — input of w2, ``a = silu(clamp(x w1ᵀ)) · clamp(x w3ᵀ)``
  with the master w1/w3 (``hessian.swiglu_intermediate``). Unweighted by default: vLLM and
  transformers multiply by the routing weight g after w2. ``w2_weighting="routing"`` uses
  ``Σ g²·a aᵀ`` (DeepSeek's reference scales before w2) to compare.

Modes: ``identity`` skips the attention sub-layer entirely (for DSV4 its mHC mixing too:
the FFN's hc_pre sees the projected inputs unchanged — mtp_dsv4.py says why that, not
``y = 0``); ``full`` runs the real block over whole sequences.

Memory: the stores are streamed (``StoreReader``) within ``max_bytes`` of host memory;
``identity`` replays batches of independent rows, ``full`` replays groups of whole
sequences (attention needs each sequence's earlier rows). Only the requested experts'
Hessians and w1/w3 live on the device. Rows are replayed in store order whatever the
batching, so the result depends on ``max_bytes`` only through fp32 summation order.

Partitions (``partition.py``): ``replay_partitions`` replays chosen partitions of one split,
each into an fp32 partial set that is folded into a ``hessian.FixedPointSum`` — a worker's
share of a data-parallel sum, exact under any grouping. ``split_hessians`` does all of one
split in this process (the stage's numbers, e.g. held-out Hessians for a policy study).

Making a store to replay from a tiny fixture (CPU, ~1 min)::

    from requant.hooks.fixtures import make_dsv4
    from requant.hooks.hf_engine import HFCaptureConfig, capture_hf
    ckpt = make_dsv4("/tmp/dsv4", seed=0)
    capture_hf(HFCaptureConfig(model=str(ckpt), store="/tmp/dsv4-cap", max_new_tokens=16),
               ["tell me about experts", "why quantize the hessian"])
    # or: requant capture --engine hf /tmp/dsv4 --store /tmp/dsv4-cap --prompts prompts.txt

    from requant.quantizer.arch import load_block
    from requant.quantizer.replay import ReplayConfig, accumulate_hessians
    block = load_block("/tmp/dsv4")
    res = accumulate_hessians(block, ["/tmp/dsv4-cap"], ReplayConfig(mode="full"))
    res.h_in.h.shape, res.h_mid.h.shape, res.tokens_per_expert   # [8,512,512], [8,256,256], [8]

(DSV3: ``make_dsv3`` and ``requant capture --engine vllm``; see hooks/cli.py.)
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from .hessian import FixedPointSum, HessianSet, fixed_point_shift, swiglu_intermediate
from .limits import MAX_BYTES, MAX_ROWS

MODES = ("identity", "full")
WEIGHTINGS = ("none", "routing")


@dataclass(frozen=True)
class ReplayConfig:
    mode: str = "identity"          # "identity" | "full"
    w2_weighting: str = "none"      # "none" | "routing" (Σ g²·a·aᵀ)
    max_bytes: int = MAX_BYTES      # host memory bound for the rows being replayed
    device: str | None = None       # None: cuda if available else cpu
    max_rows: int | None = MAX_ROWS  # rows per block call (bounds device memory); None: from max_bytes

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"replay mode must be one of {MODES}, got {self.mode!r}")
        if self.w2_weighting not in WEIGHTINGS:
            raise ValueError(f"w2_weighting must be one of {WEIGHTINGS}, got {self.w2_weighting!r}")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"max_rows must be positive, got {self.max_rows}")
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {self.max_bytes}")


@dataclass
class ReplayResult:
    h_in: HessianSet                # expert inputs (w1/w3), only the requested experts
    h_mid: HessianSet               # intermediates (w2)
    rows: int                       # store rows replayed
    tokens_per_expert: torch.Tensor  # [n_experts] int64, all experts
    seconds: float


def _device(cfg: ReplayConfig) -> torch.device:
    return torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def check_store_matches(block, stores: list[str]) -> None:
    """Refuse stores whose rows the block cannot replay: hidden size, hc_mult, no rows."""
    from requant.storage import CaptureStore, StoreReader

    spec = block.spec
    if not stores:
        raise ValueError("no capture stores given")
    for path in stores:
        meta = CaptureStore.open(str(path)).meta
        if meta.hidden_size != spec.hidden:
            raise ValueError(f"{path}: store hidden_size {meta.hidden_size} != MTP hidden_size {spec.hidden} "
                             f"({spec.arch} master)")
        if meta.hc_mult != spec.hc_mult:
            raise ValueError(f"{path}: store hc_mult {meta.hc_mult} != MTP hc_mult {spec.hc_mult} "
                             f"({spec.arch} master)")
        with StoreReader([str(path)], threads=1) as reader:
            rows = reader.rows
        if rows == 0:
            raise ValueError(f"{path}: store has 0 committed rows (the MTP layer has {spec.n_experts} experts "
                             "to calibrate); capture first")


def _reader(stores: list[str]):
    from requant.storage import StoreReader  # here: the accumulator alone needs no storage stack

    return StoreReader([str(s) for s in stores])


def _chunks(reader, cfg: ReplayConfig, runs: list[tuple[int, str, int, int]] | None = None
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int] | None]]:
    """(hidden bf16 [T, w], next_token [T], position [T], seq_lens) in store order, of all
    rows or of the sequences in ``runs`` (see ``StoreReader.sequences``).

    identity: the reader's batches as they come. full: whole sequences, gathered into groups
    of at most half of ``max_bytes`` (the reader holds the other half) and ``max_rows`` rows
    (a sequence longer than that is one group of its own)."""
    half = max(cfg.max_bytes // 2, 1)
    cap = max(half // reader.row_bytes, 1)
    if cfg.max_rows is not None:  # a longer sequence still goes whole: attention needs all of it
        cap = min(cap, cfg.max_rows)
    if cfg.mode == "identity":
        # The reader cuts a batch at every run's end (a partition's runs are separated by held-out
        # sequences): consecutive short batches go to the block as one call of up to ``cap`` rows,
        # since each call has a fixed cost (seen on a GPU: ~0.1 s per call at DSV4 shapes).
        pend: list = []
        n = 0
        for b in reader.batches(max_rows=cfg.max_rows, max_bytes=half, runs=runs):
            if pend and n + len(b) > cap:
                yield _joined(pend)
                pend, n = [], 0
            pend.append(b)
            n += len(b)
        if pend:
            yield _joined(pend)
        return
    group: list = []
    rows = 0

    def flush():
        return (torch.cat([s.hidden_torch() for s in group]),
                torch.cat([torch.from_numpy(s.next_token).long() for s in group]),
                torch.cat([torch.from_numpy(s.position).long() for s in group]),
                [len(s.next_token) for s in group])

    for s in reader.sequences(max_bytes=half, runs=runs):
        n = len(s.next_token)
        if group and rows + n > cap:
            yield flush()
            group, rows = [], 0
        # the reader reuses nothing, but copy so a group never pins a whole reader batch
        group.append(type(s)(s.seq, s.prompt_id, s.replica, s.writer, s.hidden.copy(),
                             s.next_token.copy(), s.position.copy()))
        rows += n
    if group:
        yield flush()


def _joined(batches: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
    """Reader batches as one identity-mode block call's rows."""
    cat = (lambda xs: xs[0] if len(xs) == 1 else torch.cat(xs))  # noqa: E731
    return (cat([b.hidden_torch() for b in batches]), cat([torch.from_numpy(b.next_token).long() for b in batches]),
            cat([torch.from_numpy(b.position).long() for b in batches]), None)


def route_counts(block, stores: list[str], cfg: ReplayConfig) -> torch.Tensor:
    """Tokens routed to each expert over the stores: [n_experts] int64 (sums to rows × topk)."""
    check_store_matches(block, stores)
    counts = torch.zeros(block.spec.n_experts, dtype=torch.int64)
    with torch.no_grad(), _reader(stores) as reader:
        for hidden, tok, pos, lens in _chunks(reader, cfg):
            _, ids, _ = block.moe_inputs(hidden, tok, pos, cfg.mode, lens)
            counts += torch.bincount(ids.reshape(-1).cpu(), minlength=block.spec.n_experts)
    return counts


class HessianAccumulator:
    """Per-expert Hessians from the block's outputs, batch by batch (no store involved: the
    replay below feeds it, benchmarks feed it synthetic rows).

    ``add(x, ids, g)``: MoE inputs x [T, H], top-k ids [T, k] and weights [T, k]. Owned experts'
    (token, slot) pairs are grouped by expert in token order; ``h_in`` takes x, ``h_mid`` the
    swiglu intermediate from the master w1/w3 (× g with ``w2_weighting="routing"``)."""

    def __init__(self, block, experts: Sequence[int] | None = None, device: str | torch.device | None = None,
                 w2_weighting: str = "none"):
        spec = block.spec
        if w2_weighting not in WEIGHTINGS:
            raise ValueError(f"w2_weighting must be one of {WEIGHTINGS}, got {w2_weighting!r}")
        ids = torch.arange(spec.n_experts) if experts is None else torch.as_tensor(list(experts), dtype=torch.long)
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= spec.n_experts \
                or len(set(ids.tolist())) != ids.numel():
            raise ValueError(f"experts must be distinct ids in [0, {spec.n_experts}), got {ids.tolist()[:8]}…")
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.spec, self.device, self.experts, self.weighting = spec, dev, ids, w2_weighting
        self.h_in = HessianSet(spec.n_experts, spec.hidden, dev, experts=ids)
        self.h_mid = HessianSet(spec.n_experts, spec.moe_inter, dev, experts=ids)
        w1, _, w3 = block.expert_weights()
        self.w1 = w1.index_select(0, ids.to(w1.device)).to(dev)    # only the owned experts on the device
        self.w3 = w3.index_select(0, ids.to(w3.device)).to(dev)
        local = torch.full((spec.n_experts,), -1, dtype=torch.long)
        local[ids] = torch.arange(ids.numel())
        self.local = local.to(dev)
        self.tokens = torch.zeros(spec.n_experts, dtype=torch.int64)   # every expert, owned or not
        self.rows = 0

    def reset(self) -> None:
        """Back to empty, memory kept (the next partition's partial)."""
        for hs in (self.h_in, self.h_mid):
            hs.h.zero_()
            hs.count.zero_()
        self.tokens.zero_()
        self.rows = 0

    def add(self, x: torch.Tensor, ids: torch.Tensor, g: torch.Tensor) -> None:
        k = self.spec.topk
        x, ids, g = x.to(self.device), ids.to(self.device), g.to(self.device)
        self.tokens += torch.bincount(ids.reshape(-1), minlength=self.spec.n_experts).cpu()
        self.rows += x.shape[0]
        lid = self.local[ids.reshape(-1)]
        pair = torch.nonzero(lid >= 0).squeeze(1)                  # flat (token, slot) indices
        pair = pair[torch.argsort(lid[pair], stable=True)]         # grouped by expert, token order kept
        counts = torch.bincount(lid[pair], minlength=self.experts.numel()).cpu()
        if not pair.numel():
            return
        xs = x.index_select(0, pair // k)
        self.h_in.add_segments(xs, counts)
        mids, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n:
                a = swiglu_intermediate(xs[start:start + n], self.w1[e], self.w3[e], self.spec.swiglu_limit)
                if self.weighting == "routing":
                    a = a.float() * g.reshape(-1)[pair[start:start + n], None]
                mids.append(a)
                start += n
        self.h_mid.add_segments(torch.cat(mids), counts)


def accumulate_hessians(block, stores: list[str], cfg: ReplayConfig, experts: Sequence[int] | None = None,
                        progress: Callable[[int], None] | None = None) -> ReplayResult:
    """Replay ``stores`` through ``block`` and accumulate w1/w3 and w2 Hessians for ``experts``
    (default: all). ``progress(n)`` is called with the rows of each replayed chunk."""
    t0 = time.perf_counter()
    check_store_matches(block, stores)
    acc = HessianAccumulator(block, experts, _device(cfg), cfg.w2_weighting)
    with torch.no_grad(), _reader(stores) as reader:
        for hidden, tok, pos, lens in _chunks(reader, cfg):
            acc.add(*block.moe_inputs(hidden, tok, pos, cfg.mode, lens))
            if progress is not None:
                progress(hidden.shape[0])
    return ReplayResult(acc.h_in, acc.h_mid, acc.rows, acc.tokens, time.perf_counter() - t0)


# -- partitions → exact (fixed-point) sums -------------------------------------------------------

def row_bounds(block, w2_weighting: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """Upper bounds (float64 [E], per expert) of one store row's contribution to any entry of
    the expert's w1/w3 input Hessian and of its w2 intermediate Hessian — what fixes the
    fixed-point grid before any row is seen.

    |x_i x_j| ≤ ‖x‖² ≤ B (``block.moe_input_bound``). The intermediate a_j = silu(clamp(g_j))·
    clamp(u_j) with |g_j| ≤ ‖x‖·‖w1_j‖, |u_j| ≤ ‖x‖·‖w3_j‖; clamping at L bounds |silu| by
    max(L, 0.28) and |u| by L; the routing weighting multiplies by g² ≤ max weight²."""
    spec = block.spec
    b = float(block.moe_input_bound())
    w1, _, w3 = block.expert_weights()
    norm = lambda w: torch.linalg.vector_norm(w, dim=2, dtype=torch.float32).double().cpu()  # noqa: E731
    n1, n3 = norm(w1) * b ** 0.5, norm(w3) * b ** 0.5          # [E, I]: bounds of |g_j|, |u_j|
    if spec.swiglu_limit is not None:
        n1 = n1.clamp(max=max(float(spec.swiglu_limit), 0.2785))
        n3 = n3.clamp(max=float(spec.swiglu_limit))
    mid = (n1 * n3).amax(1).square() * 1.05                     # +5%: the bf16 roundings of gate, up, a
    if w2_weighting == "routing":
        mid = mid * float(block.routing_weight_bound()) ** 2
    return torch.full((spec.n_experts,), b, dtype=torch.float64), mid


@dataclass
class PartitionSums:
    """One worker's exact sums over the partitions of one split it replayed (or, recovering or
    replicated, over all of them for some experts)."""
    plan_id: str
    split: str
    mode: str
    h_in: FixedPointSum
    h_mid: FixedPointSum
    tokens: torch.Tensor            # [n_experts] int64: routed tokens, every expert
    partitions: list[int]           # indices folded, in order
    rows: int = 0
    seconds: float = 0.0
    fold_seconds: float = 0.0       # of ``seconds``: resetting partials and folding them into the sums


def new_sums(block, plan, split: str, mode: str, experts: Sequence[int] | None, device,
             w2_weighting: str = "none") -> PartitionSums:
    """Empty sums whose grid covers all rows of ``split`` (the same grid on every worker)."""
    spec = block.spec
    rows = plan.rows(split)
    b_in, b_mid = row_bounds(block, w2_weighting)
    ids = torch.arange(spec.n_experts) if experts is None else torch.as_tensor(list(experts), dtype=torch.long)
    mk = lambda dim, b: FixedPointSum(spec.n_experts, dim, fixed_point_shift(b, rows), b, device, ids)  # noqa: E731
    return PartitionSums(plan.id, split, mode, mk(spec.hidden, b_in), mk(spec.moe_inter, b_mid),
                         torch.zeros(spec.n_experts, dtype=torch.int64), [])


def replay_partitions(block, reader, plan, sums: PartitionSums, parts: Sequence[int], cfg: ReplayConfig,
                      progress: Callable[[int], None] | None = None,
                      after_each: Callable[[int], None] | None = None) -> PartitionSums:
    """Replay partitions ``parts`` of ``sums.split`` (mode ``cfg.mode``) from ``reader`` (over the
    plan's stores) and fold each, as one fp32 partial, into ``sums``. A partition is replayed
    in batches fixed by the partition and ``cfg`` alone, so its partial is the same bits on
    any worker. ``after_each(index)``: called after each fold."""
    if sums.plan_id != plan.id:
        raise ValueError(f"partition plan {plan.id} differs from the plan {sums.plan_id} these sums were "
                         "started with (the partition count or the stores changed): refusing to mix them")
    if cfg.mode != sums.mode:
        raise ValueError(f"replay mode {cfg.mode!r} differs from the sums' mode {sums.mode!r}")
    t0 = time.perf_counter()
    split = plan.parts(sums.split)
    acc = HessianAccumulator(block, sums.h_in.experts.tolist(), _device(cfg), cfg.w2_weighting)
    with torch.no_grad():
        for i in parts:
            if i in sums.partitions:
                raise ValueError(f"{sums.split} partition {i} added twice")
            t1 = time.perf_counter()
            acc.reset()
            sums.fold_seconds += time.perf_counter() - t1
            for hidden, tok, pos, lens in _chunks(reader, cfg, split[i].reader_runs()):
                acc.add(*block.moe_inputs(hidden, tok, pos, cfg.mode, lens))
                if progress is not None:
                    progress(hidden.shape[0])
            if acc.rows != split[i].rows:
                raise RuntimeError(f"{sums.split} partition {i}: replayed {acc.rows} rows, the plan has {split[i].rows}")
            t1 = time.perf_counter()
            sums.h_in.add_(acc.h_in, acc.rows)
            sums.h_mid.add_(acc.h_mid, acc.rows)
            sums.fold_seconds += time.perf_counter() - t1  # add_ reads its checks back: synchronised
            sums.tokens += acc.tokens
            sums.rows += acc.rows
            sums.partitions.append(i)
            if after_each is not None:
                after_each(i)
    sums.seconds += time.perf_counter() - t0
    return sums


def split_hessians(block, plan, split: str, cfg: ReplayConfig, experts: Sequence[int] | None = None
                   ) -> tuple[HessianSet, HessianSet, torch.Tensor]:
    """fp32 (w1/w3 input, w2 intermediate) Hessians and routed tokens of every partition of
    ``split`` (e.g. "heldout"), in this process — the numbers the stage computes with any
    number of workers."""
    check_store_matches(block, list(plan.stores))
    sums = new_sums(block, plan, split, cfg.mode, experts, _device(cfg), cfg.w2_weighting)
    with _reader(list(plan.stores)) as reader:
        replay_partitions(block, reader, plan, sums, range(len(plan.parts(split))), cfg)
    return sums.h_in.to_set(), sums.h_mid.to_set(), sums.tokens

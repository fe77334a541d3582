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
the FFN's hc_pre sees the projected inputs unchanged — mtp/dsv4.py says why that, not
``y = 0``); ``full`` runs the real block over whole sequences.

Memory: the stores are streamed (``StoreReader``) within ``max_bytes`` of host memory;
``identity`` replays batches of independent rows, ``full`` replays groups of whole
sequences (attention needs each sequence's earlier rows). Only the requested experts'
Hessians and w1/w3 live on the device. Rows are replayed in store order whatever the
batching, so the result depends on ``max_bytes`` only through fp32 summation order.

Partitions (``partition``): ``replay_partitions`` replays chosen partitions of one split
and folds them into a ``hessian.FixedPointSum`` (int64 upper triangles) — a worker's share of a
data-parallel sum, exact under any grouping — through fp32 partials of ``FOLD_EXPERTS`` experts
over ``fold_rows`` rows at a time (``core.limits``), never a whole fp32 set. ``split_hessians``
does all of one split in this process (the stage's numbers, e.g. held-out Hessians for a
policy study).

Making a store to replay from a tiny fixture (CPU)::

    from requant.hooks.fixtures import make_dsv4
    from requant.hooks.hf_engine import HFCaptureConfig, capture_hf
    ckpt = make_dsv4("/tmp/dsv4", seed=0)
    capture_hf(HFCaptureConfig(model=str(ckpt), store="/tmp/dsv4-cap", max_new_tokens=16),
               ["tell me about experts", "why quantize the hessian"])
    # or: requant capture --engine hf /tmp/dsv4 --store /tmp/dsv4-cap --prompts prompts.txt

    from requant.quantizer.mtp.arch import load_block
    from requant.quantizer.stage.replay import ReplayConfig, accumulate_hessians
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

from requant.quantizer.core.hessian import FixedPointSum, HessianSet, fixed_point_shift, swiglu_intermediate
from requant.quantizer.core.limits import FOLD_EXPERTS, FOLD_ROWS, MAX_BYTES, MAX_ROWS

MODES = ("identity", "full")
WEIGHTINGS = ("none", "routing")


@dataclass(frozen=True)
class ReplayConfig:
    mode: str = "identity"          # "identity" | "full"
    w2_weighting: str = "none"      # "none" | "routing" (Σ g²·a·aᵀ)
    max_bytes: int = MAX_BYTES      # host memory bound for the rows being replayed
    device: str | None = None       # None: cuda if available else cpu
    max_rows: int | None = MAX_ROWS  # rows per block call (bounds device memory); None: from max_bytes
    fold_rows: int = FOLD_ROWS      # rows of a partition per fp32 partial (partitions only)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"replay mode must be one of {MODES}, got {self.mode!r}")
        if self.w2_weighting not in WEIGHTINGS:
            raise ValueError(f"w2_weighting must be one of {WEIGHTINGS}, got {self.w2_weighting!r}")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"max_rows must be positive, got {self.max_rows}")
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {self.max_bytes}")
        if self.fold_rows < 1:
            raise ValueError(f"fold_rows must be positive, got {self.fold_rows}")


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
    if cfg.mode == "identity":
        for b in reader.batches(max_rows=cfg.max_rows, max_bytes=half, runs=runs):
            yield (b.hidden_torch(), torch.from_numpy(b.next_token).long(),
                   torch.from_numpy(b.position).long(), None)
        return
    cap = max(half // reader.row_bytes, 1)
    if cfg.max_rows is not None:  # a longer sequence still goes whole: attention needs all of it
        cap = min(cap, cfg.max_rows)
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

    def add(self, x: torch.Tensor, ids: torch.Tensor, g: torch.Tensor) -> None:
        x, ids, g = x.to(self.device), ids.to(self.device), g.to(self.device)
        self.tokens += torch.bincount(ids.reshape(-1), minlength=self.spec.n_experts).cpu()
        self.rows += x.shape[0]
        pair, counts = _group_pairs(ids, self.local, self.experts.numel())
        _add_pairs(self.h_in, self.h_mid, x, g, pair, counts.tolist(), self.w1, self.w3, range(self.experts.numel()),
                   self.spec, self.weighting)


def _group_pairs(ids: torch.Tensor, local: torch.Tensor, n_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat (token, slot) indices of ``ids`` [T, k] routed to local experts (``local``: global
    id → local index or −1), grouped by local expert with token order kept, and their counts."""
    lid = local[ids.reshape(-1)]
    pair = torch.nonzero(lid >= 0).squeeze(1)
    pair = pair[torch.argsort(lid[pair], stable=True)]
    return pair, torch.bincount(lid[pair], minlength=n_local).cpu()


def _add_pairs(h_in: HessianSet, h_mid: HessianSet, x: torch.Tensor, g: torch.Tensor, pair: torch.Tensor,
               counts: list[int], w1: torch.Tensor, w3: torch.Tensor, rows, spec, weighting: str) -> None:
    """``h_in``/``h_mid`` (experts in ``counts`` order) += the Gram matrices of MoE inputs ``x`` and
    of their swiglu intermediates over ``pair`` (grouped by expert, ``counts`` each); ``rows``:
    each expert's row in the stacks ``w1``/``w3``."""
    if not pair.numel():
        return
    xs = x.index_select(0, pair // spec.topk)
    h_in.add_segments(xs, torch.tensor(counts))
    mids, start = [], 0
    for e, n in enumerate(counts):
        if n:
            a = swiglu_intermediate(xs[start:start + n], w1[rows[e]], w3[rows[e]], spec.swiglu_limit)
            if weighting == "routing":
                a = a.float() * g.reshape(-1)[pair[start:start + n], None]
            mids.append(a)
            start += n
    h_mid.add_segments(torch.cat(mids), torch.tensor(counts))


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


def new_sums(block, plan, split: str, mode: str, experts: Sequence[int] | None, device,
             w2_weighting: str = "none", batch: int = FOLD_EXPERTS) -> PartitionSums:
    """Empty sums whose grid covers all rows of ``split`` (the same grid on every worker), in
    blocks of ``batch`` experts (the GPTQ batches: what the reduce sends to one owner)."""
    spec = block.spec
    rows = plan.rows(split)
    b_in, b_mid = row_bounds(block, w2_weighting)
    ids = torch.arange(spec.n_experts) if experts is None else torch.as_tensor(list(experts), dtype=torch.long)

    def mk(dim, b):
        return FixedPointSum(spec.n_experts, dim, fixed_point_shift(b, rows), b, device, ids, block=batch)
    return PartitionSums(plan.id, split, mode, mk(spec.hidden, b_in), mk(spec.moe_inter, b_mid),
                         torch.zeros(spec.n_experts, dtype=torch.int64), [])


class _Folds:
    """The block's outputs for up to ``fold_rows`` rows of one partition, folded into ``sums``
    FOLD_EXPERTS experts at a time: the fp32 partial holds one such chunk's Hessians, never the
    whole set (DSV4-Flash: 1.3 GB, not 21.5 GB). The window is a property of the partition and
    the batching (it restarts with every partition), so every worker folds the same partials.
    Each expert's fp32 sum sees its rows in the order, and in the GEMMs, of a whole-set
    ``HessianAccumulator``: with one window per partition the sums are the same bits."""

    def __init__(self, block, sums: PartitionSums, device: torch.device, weighting: str):
        spec = block.spec
        self.spec, self.sums, self.device, self.weighting = spec, sums, device, weighting
        ids = sums.h_in.experts
        w1, _, w3 = block.expert_weights()
        if w1.device == torch.empty(0, device=device).device:  # the master's stacks where they sit: no copy
            self.w1, self.w3, self.rows_of = w1, w3, ids.tolist()
        else:                    # only these experts on the device
            self.w1 = w1.index_select(0, ids.to(w1.device)).to(device)
            self.w3 = w3.index_select(0, ids.to(w3.device)).to(device)
            self.rows_of = list(range(len(ids)))
        local = torch.full((spec.n_experts,), -1, dtype=torch.long)
        local[ids] = torch.arange(ids.numel())
        self.local = local.to(device)
        chunks = sums.h_in.blocks  # within a block, FOLD_EXPERTS at a time (the last one shorter)
        self.chunks = [(e0, min(e0 + FOLD_EXPERTS, b1)) for b0, b1 in chunks for e0 in range(b0, b1, FOLD_EXPERTS)]
        self.batches: list[tuple] = []
        self.rows = 0
        self.tokens = torch.zeros(spec.n_experts, dtype=torch.int64)

    def add(self, x: torch.Tensor, ids: torch.Tensor, g: torch.Tensor) -> None:
        x, ids, g = x.to(self.device), ids.to(self.device), g.to(self.device)
        self.tokens += torch.bincount(ids.reshape(-1), minlength=self.spec.n_experts).cpu()
        self.rows += x.shape[0]
        pair, counts = _group_pairs(ids, self.local, len(self.rows_of))
        offs = [0] + torch.cumsum(counts, 0).tolist()
        self.batches.append((x, g, pair, offs))

    def fold(self) -> None:
        """Fold the window into the sums, chunk by chunk; empty it."""
        if not self.batches:
            return
        spec, sums = self.spec, self.sums
        for lo, hi in self.chunks:
            ids = sums.h_in.experts[lo:hi]
            h_in = HessianSet(spec.n_experts, spec.hidden, self.device, experts=ids)
            h_mid = HessianSet(spec.n_experts, spec.moe_inter, self.device, experts=ids)
            for x, g, pair, offs in self.batches:
                counts = [offs[e + 1] - offs[e] for e in range(lo, hi)]
                _add_pairs(h_in, h_mid, x, g, pair[offs[lo]:offs[hi]], counts, self.w1, self.w3,
                           self.rows_of[lo:hi], spec, self.weighting)
            sums.h_in.add_(h_in, self.rows, start=lo)
            sums.h_mid.add_(h_mid, self.rows, start=lo)
            del h_in, h_mid
        sums.tokens += self.tokens
        self.tokens.zero_()
        self.batches, self.rows = [], 0


def replay_partitions(block, reader, plan, sums: PartitionSums, parts: Sequence[int], cfg: ReplayConfig,
                      progress: Callable[[int], None] | None = None,
                      after_each: Callable[[int], None] | None = None) -> PartitionSums:
    """Replay partitions ``parts`` of ``sums.split`` (mode ``cfg.mode``) from ``reader`` (over the
    plan's stores) and fold each into ``sums``: every ``cfg.fold_rows`` rows (whole batches) as
    fp32 partials of a few experts at a time (``_Folds``). A partition is replayed in batches
    fixed by the partition and ``cfg`` alone, so its partials are the same bits on any worker.
    ``after_each(index)``: called after each partition."""
    if sums.plan_id != plan.id:
        raise ValueError(f"partition plan {plan.id} differs from the plan {sums.plan_id} these sums were "
                         "started with (the partition count or the stores changed): refusing to mix them")
    if cfg.mode != sums.mode:
        raise ValueError(f"replay mode {cfg.mode!r} differs from the sums' mode {sums.mode!r}")
    t0 = time.perf_counter()
    split = plan.parts(sums.split)
    with torch.no_grad():
        for i in parts:
            if i in sums.partitions:
                raise ValueError(f"{sums.split} partition {i} added twice")
            folds, rows = _Folds(block, sums, _device(cfg), cfg.w2_weighting), 0
            for hidden, tok, pos, lens in _chunks(reader, cfg, split[i].reader_runs()):
                n = hidden.shape[0]
                if folds.rows and folds.rows + n > cfg.fold_rows:
                    folds.fold()
                folds.add(*block.moe_inputs(hidden, tok, pos, cfg.mode, lens))
                rows += n
                if progress is not None:
                    progress(n)
            if rows != split[i].rows:  # (the sums hold part of it now: this worker's sums are spoilt)
                raise RuntimeError(f"{sums.split} partition {i}: replayed {rows} rows, the plan has {split[i].rows}")
            folds.fold()
            sums.rows += rows
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

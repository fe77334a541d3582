"""Per-expert GPTQ Hessians H_e = Σ xᵀx over the tokens routed to expert e.

Tokens arrive batch by batch with their top-k expert ids. Pairs (token, expert) are sorted
by expert once per batch, so each expert's rows are one contiguous segment. On CUDA one
grouped Triton kernel updates every expert's H from the captured bf16 rows on tensor
cores, promoting partial sums to fp32 every 512 tokens and computing only the upper
triangle (``hessian_triton``); the inputs are bf16 already, so this is exact up to
summation order. Elsewhere: one fp32 GEMM per expert segment (no loop over tokens).

Partial sets from several workers merge by addition and round-trip through safetensors.
``FixedPointSum`` adds partial sets exactly (int64 fixed point), so a sum over partitions
is the same bits whatever the grouping — any worker count, any collective's order.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def swiglu_intermediate(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, limit: float | None) -> torch.Tensor:
    """``silu(clamp(x w1ᵀ, max=L)) · clamp(x w3ᵀ, −L, L)`` — the w2 input (DSV4 clamps; None = no clamp)."""
    gate = x @ w1.T.to(x.dtype)
    up = x @ w3.T.to(x.dtype)
    if limit is not None:
        gate = gate.clamp(max=limit)
        up = up.clamp(-limit, limit)
    return torch.nn.functional.silu(gate) * up


def _add_gram(h: torch.Tensor, x: torch.Tensor) -> None:
    """h += xᵀx with fp32 accumulation (cuBLAS tensor cores for bf16/fp16 rows on CUDA)."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        h += torch.mm(x.T, x, out_dtype=torch.float32)
    else:
        xf = x.float()
        h.addmm_(xf.T, xf)


def _grouped_kernel():
    try:
        from requant.quantizer.core.hessian_triton import grouped_syrk_
    except Exception:  # no Triton (CPU builds): per-expert GEMMs
        return None
    return grouped_syrk_


class HessianSet:
    """Hessians ``h`` [E, d, d] fp32 (unnormalised sums) and token counts ``count`` [E]."""

    def __init__(self, num_experts: int, dim: int, device: str | torch.device = "cpu",
                 experts: torch.Tensor | None = None, backend: str = "auto"):
        if backend not in ("auto", "cublas", "triton"):
            raise ValueError(f"unknown Hessian backend {backend!r}")
        self.backend = backend
        # `experts` restricts which global expert ids this set owns (expert-parallel workers).
        self.experts = (torch.arange(num_experts) if experts is None else experts.cpu().long())
        self.num_experts = num_experts
        self.dim = dim
        self.h = torch.zeros(len(self.experts), dim, dim, dtype=torch.float32, device=device)
        self.count = torch.zeros(len(self.experts), dtype=torch.int64)
        self._local = torch.full((num_experts,), -1, dtype=torch.long)
        self._local[self.experts] = torch.arange(len(self.experts))

    @property
    def device(self) -> torch.device:
        return self.h.device

    def add(self, x: torch.Tensor, expert_ids: torch.Tensor) -> None:
        """Accumulate tokens ``x`` [T, d] routed to ``expert_ids`` [T] or [T, k] (global ids)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"activations must be [tokens, {self.dim}], got {tuple(x.shape)}")
        ids = expert_ids if expert_ids.ndim == 2 else expert_ids[:, None]
        if ids.shape[0] != x.shape[0]:
            raise ValueError(f"{x.shape[0]} tokens but {ids.shape[0]} rows of expert ids")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_experts):
            raise ValueError(f"expert id outside [0, {self.num_experts})")
        if not torch.isfinite(x).all():
            raise ValueError("non-finite activations in Hessian input")
        x = x.to(self.device)
        tok = torch.arange(x.shape[0], device=ids.device).repeat_interleave(ids.shape[1])
        local = self._local.to(ids.device)[ids.reshape(-1)]
        keep = local >= 0
        tok, local = tok[keep], local[keep]
        order = torch.argsort(local, stable=True)
        tok, local = tok[order], local[order]
        counts = torch.bincount(local, minlength=len(self.experts)).cpu()
        self.count += counts
        self._accumulate(x.index_select(0, tok.to(self.device)), counts)

    def add_segments(self, xs: torch.Tensor, counts: torch.Tensor) -> None:
        """Accumulate rows already grouped by local expert: ``xs`` [Σcounts, d], ``counts`` [E_local]."""
        if xs.ndim != 2 or xs.shape[1] != self.dim or xs.shape[0] != int(counts.sum()):
            raise ValueError(f"segments must be [{int(counts.sum())}, {self.dim}], got {tuple(xs.shape)}")
        self._accumulate(xs, counts.cpu())
        self.count += counts.cpu()

    def _accumulate(self, xs: torch.Tensor, counts: torch.Tensor) -> None:
        fused = (self.backend != "cublas" and xs.is_cuda and xs.dtype in (torch.bfloat16, torch.float16)
                 and self.dim % 128 == 0 and xs.stride(-1) == 1)
        kernel = _grouped_kernel() if fused else None
        if kernel is not None:
            kernel(self.h, xs, counts)
            return
        if self.backend == "triton" and xs.is_cuda:
            raise RuntimeError("Triton Hessian kernel unavailable for these inputs")
        start = 0
        for e, n in enumerate(counts.tolist()):  # one GEMM per expert segment
            if n:
                _add_gram(self.h[e], xs[start:start + n])
                start += n

    def merge_(self, other: "HessianSet") -> "HessianSet":
        if not torch.equal(self.experts, other.experts) or self.dim != other.dim:
            raise ValueError("cannot merge Hessian sets over different experts or dimensions")
        self.h += other.h.to(self.device)
        self.count += other.count
        return self

    def to(self, device: str | torch.device) -> "HessianSet":
        """Moved to ``device`` (in place)."""
        self.h = self.h.to(device)
        return self

    def sums(self, index: slice | list[int] | None = None, device: str | torch.device | None = None) -> torch.Tensor:
        """Unnormalised Σ xxᵀ of local experts ``index`` (default all), on ``device``."""
        h = self.h if index is None else self.h[index]
        return h if device is None else h.to(device)

    def pooled(self) -> torch.Tensor:
        """Σ_e H_e / Σ_e T_e over these experts [d, d] (the ``shrink`` policy's pool)."""
        return self.h.sum(0) / max(int(self.count.sum()), 1)

    def mean(self, index: slice | list[int] | None = None) -> torch.Tensor:
        """H / n per expert (zero-token experts stay all-zero), optionally for a subset of
        local experts only (avoids a second full-size copy at DSV4 scale: 17 GB)."""
        index = slice(None) if index is None else index
        n = self.count[index].clamp(min=1).to(self.device, torch.float32)
        return self.h[index] / n[:, None, None]

    def save(self, path: str | Path) -> None:
        meta = {"num_experts": str(self.num_experts), "dim": str(self.dim), "format": "requant.hessians/1"}
        save_file({"h": self.h.cpu().contiguous(), "count": self.count, "experts": self.experts},
                  str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "HessianSet":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "requant.hessians/1":
            raise ValueError(f"{path}: not a requant Hessian file (metadata {json.dumps(meta)})")
        t = load_file(str(path))
        hs = cls(int(meta["num_experts"]), int(meta["dim"]), device="meta", experts=t["experts"])
        hs.h = t["h"].to(device)
        hs.count = t["count"]
        return hs


# Fixed-point partial sums: fp32 addition is not associative, integer addition is. Each
# partial set is rounded once onto a per-expert grid of 2^-shift and added as int64, so the
# total depends only on which partials were added, not on their grouping or order. The grid
# comes from an a-priori bound on one row's contribution to any entry (``replay.row_bounds``)
# times the rows that can contribute: the whole sum stays below 2^61 and cannot overflow.
# Its step (bound·rows/2^61) sits ~40 bits below the typical entry, far under the fp32
# rounding each partial already carries.
FIXED_POINT_BITS = 61


def fixed_point_shift(row_bound: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-expert exponents s with rows · row_bound · 2^s ≤ 2^61 (int64 [E])."""
    bound = row_bound.double().clamp(min=1e-300) * max(rows, 1)
    return (FIXED_POINT_BITS - torch.ceil(torch.log2(bound))).long()


def packed_size(dim: int) -> int:
    """Entries of a d×d symmetric matrix's upper triangle (diagonal included)."""
    return dim * (dim + 1) // 2


_TRIU: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _triu(dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of the upper triangle (r ≤ c, row-major) in a d×d matrix: r·d + c, and of
    its mirror image c·d + r."""
    key = (dim, str(torch.device(device)))
    if key not in _TRIU:
        r, c = torch.triu_indices(dim, dim, device=device)
        _TRIU[key] = (r * dim + c, c * dim + r)
    return _TRIU[key]


def pack_upper(h: torch.Tensor) -> torch.Tensor:
    """[n, d, d] → [n, d(d+1)/2]: the upper triangles, row by row (a copy)."""
    n, d, _ = h.shape
    return h.reshape(n, d * d).index_select(1, _triu(d, h.device)[0])


def unpack_upper(p: torch.Tensor, dim: int) -> torch.Tensor:
    """[n, d(d+1)/2] → the symmetric [n, d, d] (upper triangle mirrored; exact: a copy of values)."""
    up, low = _triu(dim, p.device)
    out = torch.empty(p.shape[0], dim * dim, dtype=p.dtype, device=p.device)
    out.index_copy_(1, up, p)
    out.index_copy_(1, low, p)  # the diagonal twice, the same value
    return out.view(p.shape[0], dim, dim)


def _blocks(n: int, block: int) -> list[tuple[int, int]]:
    return [(s, min(s + block, n)) for s in range(0, n, max(block, 1))]


class FixedPointSum:
    """Σ of ``HessianSet`` partials over experts ``experts`` as int64 multiples of 2^-shift[e],
    upper triangles only (Hessians are symmetric: half the bytes), held in ``blocks`` of
    ``block`` consecutive experts — the GPTQ batches, so that each block is reduced to one owner
    and dropped everywhere else (``drop``).

    ``add_(hs, rows, start)`` folds one partial of experts ``experts[start:]`` built from ``rows``
    store rows (checked against the bound: a violation is an error, never a wrapped integer);
    ``q[b]`` and ``count`` are what workers sum with a collective (integer SUM: any order gives
    the same bits); ``to_packed`` / ``to_set`` give fp32 Hessians back. ``chunk`` experts are
    converted at a time, which bounds the temporary memory."""

    def __init__(self, num_experts: int, dim: int, shift: torch.Tensor, row_bound: torch.Tensor,
                 device: str | torch.device = "cpu", experts: torch.Tensor | None = None, block: int = 16,
                 chunk: int = 4):
        self.experts = torch.arange(num_experts) if experts is None else experts.cpu().long()
        self.num_experts, self.dim, self.chunk = num_experts, dim, chunk
        self.shift = shift.cpu().long()[self.experts]
        self.row_bound = row_bound.cpu().double()[self.experts]
        self.blocks = _blocks(len(self.experts), block)       # local [lo, hi) per block
        self.q: list[torch.Tensor | None] = [torch.zeros(hi - lo, packed_size(dim), dtype=torch.int64, device=device)
                                             for lo, hi in self.blocks]
        self.count = torch.zeros(len(self.experts), dtype=torch.int64)
        self.device = torch.device(device)

    @property
    def nbytes(self) -> int:
        return sum(q.numel() * q.element_size() for q in self.q if q is not None)

    def _scale(self, sl: slice, sign: int, device) -> torch.Tensor:
        exps = sign * self.shift[sl]
        return torch.ldexp(torch.ones(len(exps), dtype=torch.float64), exps).to(device)[:, None]

    def _spans(self, lo: int, hi: int):
        """(block, first, last) local pieces of experts [lo, hi), ``chunk`` experts each."""
        for b, (b0, b1) in enumerate(self.blocks):
            for e0 in range(max(lo, b0), min(hi, b1), self.chunk):
                yield b, b0, e0, min(e0 + self.chunk, hi, b1)

    def add_(self, hs: HessianSet, rows: int, start: int = 0) -> "FixedPointSum":
        n = len(hs.experts)
        if not torch.equal(hs.experts, self.experts[start:start + n]) or hs.dim != self.dim:
            raise ValueError("partial Hessians cover other experts or dimensions than the sum")
        for b, b0, e0, e1 in self._spans(start, start + n):
            q = self.q[b]
            if q is None:
                raise RuntimeError(f"experts {int(self.experts[b0])}…: block already reduced away")
            sl = slice(e0, e1)
            h = pack_upper(hs.h[e0 - start:e1 - start].to(q.device))
            limit = (self.row_bound[sl] * rows).to(h.device)
            peak = h.abs().amax(1).double()
            if not bool(torch.isfinite(peak).all()):
                raise ValueError("non-finite partial Hessian (non-finite activations in the replay)")
            if bool((peak > limit).any()):
                e = int(self.experts[sl][int((peak / limit.clamp(min=1e-300)).argmax())])
                raise RuntimeError(f"expert {e}: a Hessian entry exceeds the fixed-point bound of {rows} rows "
                                   "(the per-row bound is wrong for this block)")
            h.mul_(self._scale(sl, 1, h.device).float())  # powers of two: h·2^s is exact in fp32
            q[e0 - b0:e1 - b0] += torch.round_(h).long()
        self.count[start:start + n] += hs.count.cpu()
        return self

    def drop(self, b: int) -> None:
        """Free block ``b`` (its sum now lives on its owner)."""
        self.q[b] = None

    def _fp32(self, b: int, b0: int, e0: int, e1: int, device) -> torch.Tensor:
        q = self.q[b][e0 - b0:e1 - b0]
        return (q.double() * self._scale(slice(e0, e1), -1, q.device)).float().to(device)

    def _index(self, index: slice | None) -> slice:
        index = index or slice(0, len(self.experts))
        lo, hi, _ = index.indices(len(self.experts))
        return slice(lo, hi)

    def to_packed(self, index: slice | None = None, device: str | torch.device | None = None,
                  free: bool = True) -> "PackedHessians":
        """fp32 packed Hessians of local experts ``index`` (default all; whole blocks), on
        ``device``; ``free``: each int64 block is dropped once converted (no second set)."""
        index = self._index(index)
        dev = torch.device(device) if device is not None else self.device
        blocks = []
        for b, (b0, b1) in enumerate(self.blocks):
            if b1 <= index.start or b0 >= index.stop:
                continue
            if b0 < index.start or b1 > index.stop:
                raise ValueError(f"experts {index.start}…{index.stop - 1} do not cover whole blocks of the sum")
            if self.q[b] is None:
                raise RuntimeError(f"experts {int(self.experts[b0])}…: block already reduced away")
            out = torch.empty(b1 - b0, packed_size(self.dim), dtype=torch.float32, device=dev)
            for _, _, e0, e1 in self._spans(b0, b1):
                out[e0 - b0:e1 - b0] = self._fp32(b, b0, e0, e1, dev)
            blocks.append(out)
            if free:
                self.drop(b)
        return PackedHessians(self.num_experts, self.dim, self.experts[index], blocks, self.count[index].clone())

    def to_set(self, index: slice | None = None, device: str | torch.device | None = None) -> HessianSet:
        """fp32 full Hessians of local experts ``index`` (default all), on ``device``."""
        index = self._index(index)
        ids = self.experts[index]
        out = HessianSet(self.num_experts, self.dim, device="meta", experts=ids)
        dev = torch.device(device) if device is not None else self.device
        out.h = torch.empty(len(ids), self.dim, self.dim, dtype=torch.float32, device=dev)
        for b, b0, e0, e1 in self._spans(index.start, index.stop):
            out.h[e0 - index.start:e1 - index.start] = unpack_upper(self._fp32(b, b0, e0, e1, dev), self.dim)
        out.count = self.count[index].clone()
        return out


class PackedHessians:
    """fp32 Hessians of experts ``experts`` as upper triangles, in blocks of consecutive experts
    (half an fp32 set: what a worker keeps of its slice from the reduce to GPTQ). ``mean`` and
    ``sums`` unpack only the experts asked for — GPTQ's batch at a time. Stands in for a
    ``HessianSet`` wherever the Hessians are read (``quantize_experts``, held-out errors)."""

    def __init__(self, num_experts: int, dim: int, experts: torch.Tensor, blocks: list[torch.Tensor],
                 count: torch.Tensor):
        if sum(b.shape[0] for b in blocks) != len(experts):
            raise ValueError(f"{sum(b.shape[0] for b in blocks)} packed Hessians for {len(experts)} experts")
        self.num_experts, self.dim, self.experts, self.blocks, self.count = num_experts, dim, experts, blocks, count
        self._first = [0]
        for b in blocks:
            self._first.append(self._first[-1] + b.shape[0])

    @property
    def device(self) -> torch.device:
        return self.blocks[0].device if self.blocks else torch.device("cpu")

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.blocks)

    def to(self, device: str | torch.device) -> "PackedHessians":
        """Moved to ``device``, block by block (in place)."""
        self.blocks = [b.to(device) for b in self.blocks]
        return self

    def _positions(self, index) -> list[int]:
        n = len(self.experts)
        if index is None:
            return list(range(n))
        if isinstance(index, slice):
            return list(range(*index.indices(n)))
        return [int(i) for i in index]

    def packed(self, index: slice | list[int] | None = None) -> torch.Tensor:
        """[len(index), d(d+1)/2] packed Hessians of local experts ``index``."""
        rows = []
        for i in self._positions(index):
            b = next(k for k in range(len(self.blocks)) if self._first[k] <= i < self._first[k + 1])
            rows.append(self.blocks[b][i - self._first[b]])
        if not rows:
            return torch.empty(0, packed_size(self.dim), dtype=torch.float32, device=self.device)
        return torch.stack(rows)

    def sums(self, index: slice | list[int] | None = None, device: str | torch.device | None = None) -> torch.Tensor:
        """Unnormalised Σ xxᵀ [len(index), d, d] of local experts ``index``, unpacked on
        ``device`` (default: where they are)."""
        p = self.packed(index)
        return unpack_upper(p if device is None else p.to(device), self.dim)

    def mean(self, index: slice | list[int] | None = None) -> torch.Tensor:
        """H / n per expert (zero-token experts stay all-zero), as ``HessianSet.mean``."""
        h = self.sums(index)
        n = self.count[self._positions(index)].clamp(min=1).to(h.device, torch.float32)
        return h.div_(n[:, None, None])

    def pooled(self) -> torch.Tensor:
        """Σ_e H_e / Σ_e T_e over these experts [d, d] (the ``shrink`` policy's pool)."""
        total = sum(b.sum(0) for b in self.blocks)
        return unpack_upper(total[None], self.dim)[0] / max(int(self.count.sum()), 1)


def pool_shift(row_bound: torch.Tensor, rows: int) -> int:
    """Exponent s of the grid 2^-s on which ``pooled_sum`` adds the Hessians of all experts: any
    entry of Σ_e H_e is at most rows × experts × the largest per-row bound, kept below 2^61."""
    bound = float(row_bound.double().max()) * max(rows, 1) * len(row_bound)
    return FIXED_POINT_BITS - math.ceil(math.log2(max(bound, 1e-300)))


def pooled_sum(hs: "HessianSet | PackedHessians", shift: int, chunk: int = 16) -> torch.Tensor:
    """Σ over the set's experts of round(H_e · 2^shift): int64 [D, D]. Each H_e (itself the same bits for
    any worker count) is rounded on its own, so sums over slices of experts, added as integers, give the
    pooled Hessian of all experts in the same bits however the experts are sliced."""
    if isinstance(hs, PackedHessians):
        parts = iter(hs.blocks)
    else:
        parts = (pack_upper(hs.h[e0:e0 + chunk]) for e0 in range(0, len(hs.experts), chunk))
    out = torch.zeros(packed_size(hs.dim), dtype=torch.int64, device=hs.device)
    for part in parts:
        out += torch.round(torch.ldexp(part, torch.tensor(float(shift), device=part.device))).long().sum(0)
    return unpack_upper(out[None], hs.dim)[0]

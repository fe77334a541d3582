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
        from .hessian_triton import grouped_syrk_
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


class FixedPointSum:
    """Σ of ``HessianSet`` partials over experts ``experts`` as int64 multiples of 2^-shift[e].

    ``add_(hs, rows)`` folds one partial built from ``rows`` store rows (checked against the
    bound: a violation is an error, never a wrapped integer); ``q`` and ``count`` are what
    workers sum with a collective (integer SUM: any order gives the same bits);
    ``to_set(index)`` gives fp32 Hessians back. ``chunk`` experts are converted at a time,
    which bounds the temporary memory."""

    def __init__(self, num_experts: int, dim: int, shift: torch.Tensor, row_bound: torch.Tensor,
                 device: str | torch.device = "cpu", experts: torch.Tensor | None = None, chunk: int = 16):
        self.experts = torch.arange(num_experts) if experts is None else experts.cpu().long()
        self.num_experts, self.dim, self.chunk = num_experts, dim, chunk
        self.shift = shift.cpu().long()[self.experts]
        self.row_bound = row_bound.cpu().double()[self.experts]
        self.q = torch.zeros(len(self.experts), dim, dim, dtype=torch.int64, device=device)
        self.count = torch.zeros(len(self.experts), dtype=torch.int64)

    def _scale(self, sl: slice, sign: int, device) -> torch.Tensor:
        exps = sign * self.shift[sl]
        return torch.ldexp(torch.ones(len(exps), dtype=torch.float64), exps).to(device)[:, None, None]

    def add_(self, hs: HessianSet, rows: int) -> "FixedPointSum":
        if not torch.equal(hs.experts, self.experts) or hs.dim != self.dim:
            raise ValueError("partial Hessians cover other experts or dimensions than the sum")
        for e0 in range(0, len(self.experts), self.chunk):
            sl = slice(e0, min(e0 + self.chunk, len(self.experts)))
            h = hs.h[sl].to(self.q.device)
            limit = (self.row_bound[sl] * rows).to(h.device)
            peak = h.abs().amax((1, 2)).double()
            if not bool(torch.isfinite(peak).all()):
                raise ValueError("non-finite partial Hessian (non-finite activations in the replay)")
            if bool((peak > limit).any()):
                e = int(self.experts[sl][int((peak / limit.clamp(min=1e-300)).argmax())])
                raise RuntimeError(f"expert {e}: a Hessian entry exceeds the fixed-point bound of {rows} rows "
                                   "(the per-row bound is wrong for this block)")
            scale = self._scale(sl, 1, h.device).float()  # powers of two: h·2^s is exact in fp32
            self.q[sl] += torch.round(h * scale).long()
        self.count += hs.count.cpu()
        return self

    def to_set(self, index: slice | None = None, device: str | torch.device | None = None) -> HessianSet:
        """fp32 Hessians of local experts ``index`` (default all), on ``device``."""
        index = index or slice(0, len(self.experts))
        ids = self.experts[index]
        out = HessianSet(self.num_experts, self.dim, device="meta", experts=ids)
        dev = torch.device(device) if device is not None else self.q.device
        out.h = torch.empty(len(ids), self.dim, self.dim, dtype=torch.float32, device=dev)
        for e0 in range(0, len(ids), self.chunk):
            sl = slice(index.start + e0, index.start + min(e0 + self.chunk, len(ids)))
            q = self.q[sl]
            out.h[e0:e0 + q.shape[0]] = (q.double() * self._scale(sl, -1, q.device)).float().to(dev)
        out.count = self.count[index].clone()
        return out

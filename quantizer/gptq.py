"""Batched GPTQ (Frantar et al. 2022) over weights of equal shape.

Each batch entry is one weight W [R, C] with its Hessian H [C, C]. Rows are independent
given H, so an expert's w1 and w3 (which share the Hessian of the expert input) are
quantised as ONE entry with their rows concatenated: H is factored once for both.

Per entry, as in the reference implementation:
  dead columns (H_ii = 0) → H_ii = 1, W[:, i] = 0;  H += damp·mean(diag H)·I;
  U = upper Cholesky factor of H⁻¹;  columns in blocks of 128: quantise column i,
  spread its error e_i = (w_i − q_i)/U_ii over the rest of the block, then over all
  later columns with one GEMM per block (lazy batch update).
U is obtained with one Cholesky and one triangular inverse: for J the reversal
permutation, J·H·J = L·Lᵀ gives H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J), and J L⁻¹ J is upper
triangular with a positive diagonal — hence the upper Cholesky factor itself
(the reference needs Cholesky, cholesky_inverse and a second Cholesky).

A factorisation that fails is retried with damp ×10 up to ``damp_max``; only then the
entry falls back to RTN. The path taken is returned per entry.

Group scales are *static* by default (from the original weights, before any error
feedback — llm-compressor's choice); ``dynamic_groups`` recomputes each group's scale
from the updated weights when the column loop reaches it (the reference's choice).
``benchmarks/README.md`` compares both; act-order requires static groups because the
pack-quantized layout without ``g_idx`` assumes groups of consecutive input columns.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .quant import QuantSpec, expand_groups, group_scales

PATH_GPTQ = "gptq"
PATH_DAMP_RETRY = "gptq_damp_retry"
PATH_RTN_FALLBACK = "rtn_fallback"


@dataclass(frozen=True)
class GPTQConfig:
    spec: QuantSpec = field(default_factory=QuantSpec)
    block_size: int = 128
    damp: float = 0.01          # relative to mean(diag H)
    damp_growth: float = 10.0
    damp_max: float = 1.0       # last relative damp tried before RTN fallback
    act_order: bool = False
    dynamic_groups: bool = False
    use_triton: bool = True     # fused in-block kernel on CUDA when Triton is importable

    def __post_init__(self) -> None:
        if self.block_size % self.spec.group_size and self.dynamic_groups:
            raise ValueError("dynamic group scales need block_size to be a multiple of group_size")
        if self.act_order and self.dynamic_groups:
            raise ValueError("act-order needs static group scales (pack-quantized has no g_idx here)")


@dataclass
class GPTQResult:
    q: torch.Tensor            # int8 [B, R, C]
    scale: torch.Tensor        # float32 [B, R, C/g] (values exact in spec.scale_dtype)
    damp: torch.Tensor         # float64 [B] relative damp used (nan for RTN fallback)
    path: list[str]            # per entry: gptq | gptq_damp_retry | rtn_fallback
    dead: torch.Tensor         # int64 [B] number of dead columns
    loss: torch.Tensor         # float64 [B] Σ (w−q)²/U_ii² — the damped-H output error


def _prepare(h: torch.Tensor, cfg: GPTQConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Dead-column fix, damping with retries and U = chol(H⁻¹)ᵀ for a batch [B, C, C].

    Returns U (zeros for entries that failed at every damp), dead mask [B, C], relative
    damp [B] (nan where failed) and paths. Peak memory ≈ 4 × the batch of Hessians.
    """
    b, c, _ = h.shape
    hr = h.float().flip(-1, -2)  # J·H·J (a copy: `h` stays the caller's)
    diag = hr.diagonal(dim1=-2, dim2=-1)
    dead = (diag == 0).flip(-1)
    diag[diag == 0] = 1.0
    mean_diag = diag.mean(-1)
    u = torch.zeros_like(hr)
    rel = torch.full((b,), float("nan"), dtype=torch.float64)
    paths = [PATH_RTN_FALLBACK] * b
    todo = torch.arange(b)
    damp, first = cfg.damp, True
    eye = torch.eye(c, dtype=hr.dtype, device=hr.device)
    while len(todo) and damp <= cfg.damp_max * (1 + 1e-9):
        idx = todo.to(hr.device)
        hd = hr[idx]  # advanced indexing copies: `hr` stays undamped for retries
        hd.diagonal(dim1=-2, dim2=-1).add_((damp * mean_diag[idx])[:, None])
        low, info = torch.linalg.cholesky_ex(hd)
        del hd
        linv = torch.linalg.solve_triangular(low, eye.expand_as(low), upper=False)
        del low
        ok = (info == 0) & torch.isfinite(linv).all(-1).all(-1) & (linv.diagonal(dim1=-2, dim2=-1) > 0).all(-1)
        ok_cpu = ok.cpu()
        ok_idx = todo[ok_cpu]
        u[ok_idx.to(hr.device)] = linv[ok].flip(-1, -2)
        del linv
        rel[ok_idx] = damp
        for i in ok_idx.tolist():
            paths[i] = PATH_GPTQ if first else PATH_DAMP_RETRY
        todo = todo[~ok_cpu]
        damp *= cfg.damp_growth
        first = False
    return u, dead, rel, paths


def _block_torch(w: torch.Tensor, u: torch.Tensor, s_cols: torch.Tensor, b0: int, b1: int,
                 cfg: GPTQConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Column loop inside one block (reference order). Updates ``w[..., b0:b1]`` and
    ``s_cols`` (dynamic groups) in place; returns (q, err, loss) for the block."""
    spec = cfg.spec
    w1 = w[:, :, b0:b1]
    q1 = torch.zeros_like(w1)
    err1 = torch.zeros_like(w1)
    loss = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    hinv = u[:, b0:b1, b0:b1]
    for i in range(b1 - b0):
        col = b0 + i
        if cfg.dynamic_groups and col % spec.group_size == 0:
            s = group_scales(w1[:, :, i:i + spec.group_size], spec)
            s_cols[:, :, col:col + spec.group_size] = s.expand(-1, -1, spec.group_size)
        wi = w1[:, :, i]
        d = hinv[:, i, i][:, None]
        s = s_cols[:, :, col]
        qi = torch.clamp(wi / s, spec.qmin, spec.qmax).round()
        dq = qi * s
        e = (wi - dq) / d
        loss += (e * e).sum(-1).double()
        w1[:, :, i:] -= e[:, :, None] * hinv[:, None, i, i:]
        q1[:, :, i] = qi
        err1[:, :, i] = e
    return q1, err1, loss


def gptq_batched(w: torch.Tensor, h: torch.Tensor, cfg: GPTQConfig = GPTQConfig()) -> GPTQResult:
    """GPTQ of a batch ``w`` [B, R, C] with Hessians ``h`` [B, C, C] (any positive scale)."""
    spec = cfg.spec
    if w.ndim != 3 or h.ndim != 3 or h.shape != (w.shape[0], w.shape[2], w.shape[2]):
        raise ValueError(f"shape mismatch: weights {tuple(w.shape)}, Hessians {tuple(h.shape)}")
    spec.check_columns(w.shape[-1])
    if not torch.isfinite(w).all():
        raise ValueError("non-finite weights")
    if not torch.isfinite(h).all():
        raise ValueError("non-finite Hessian")
    bsz, rows, cols = w.shape
    w = w.float().clone()
    scale = group_scales(w, spec)  # static groups, from the original weights (= RTN scales)
    s_cols = expand_groups(scale, spec)
    perm = None
    if cfg.act_order:  # process columns by decreasing H_ii; groups stay on original columns
        perm = torch.argsort(h.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True)
        w = _permute_cols(w, perm)
        s_cols = _permute_cols(s_cols, perm)
        h = torch.gather(h, 1, perm[:, :, None].expand(-1, -1, cols))
        h = torch.gather(h, 2, perm[:, None, :].expand(-1, cols, -1))
    u, dead, rel, paths = _prepare(h, cfg)
    w.masked_fill_(dead[:, None, :], 0.0)
    # Entries whose factorisation failed at every damp get U = I: no error feedback, so
    # the loop below degenerates to exactly RTN with the same scales (the fallback).
    failed = torch.tensor([p == PATH_RTN_FALLBACK for p in paths], device=w.device)
    if failed.any():
        u[failed] = torch.eye(cols, device=w.device)

    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    loss = torch.zeros(bsz, dtype=torch.float64, device=w.device)
    kernel = _triton_block() if (cfg.use_triton and w.is_cuda) else None
    for b0 in range(0, cols, cfg.block_size):
        b1 = min(b0 + cfg.block_size, cols)
        q1, err1, l1 = (kernel or _block_torch)(w, u, s_cols, b0, b1, cfg)
        q[:, :, b0:b1] = q1
        loss += l1
        if b1 < cols:  # lazy batch update of all later columns: one batched GEMM
            w[:, :, b1:].baddbmm_(err1, u[:, b0:b1, b1:], alpha=-1.0)

    if perm is not None:
        q = _permute_cols(q, torch.argsort(perm, dim=-1))
    elif cfg.dynamic_groups:
        scale = s_cols[:, :, ::spec.group_size].contiguous()
    return GPTQResult(q=q, scale=scale, damp=rel, path=paths,
                      dead=dead.sum(-1).cpu(), loss=loss.cpu())


def _permute_cols(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 2, perm[:, None, :].expand(-1, x.shape[1], -1))


def _triton_block():
    try:
        from .gptq_triton import block_kernel
    except Exception:  # Triton missing or no CUDA: the torch loop is the fallback
        return None
    return block_kernel


def relative_output_error(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) per batch entry (float64 [B]; nan where tr(W H Wᵀ) = 0).

    A report metric, not part of the algorithm: on CUDA its GEMMs run in TF32 (about
    1e-3 relative precision of the metric, checked in the benchmark), which keeps the
    metrics of 768 DSV4 tensors to a fraction of the GPTQ time.
    """
    w = w.float()
    dw = w - wq.float()
    hf = h.float()
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        num = (torch.bmm(dw, hf) * dw).sum((-1, -2)).double()
        den = (torch.bmm(w, hf) * w).sum((-1, -2)).double()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.full_like(den, float("nan"))).cpu()

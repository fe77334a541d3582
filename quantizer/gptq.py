"""Batched GPTQ (Frantar et al. 2022) over weights of equal shape.

Each batch entry is one weight W [R, C] with its Hessian H [C, C]. Rows are independent
given H, so an expert's w1 and w3 (which share the Hessian of the expert input) are
quantised as ONE entry with their rows concatenated: H is factored once for both.

Per entry, as in the reference implementation: dead columns (H_ii = 0) → H_ii = 1,
W[:, i] = 0; H += damp·mean(diag H)·I; columns in blocks of 128, each quantised in order
with its error fed forward to the later columns, block-wise lazily through one GEMM.

Without any inverse. The reference forms U = chol(H⁻¹) (upper; Cholesky, cholesky_inverse
and a second Cholesky) and feeds errors e_j = (w̃_j − q_j)/U_jj forward through U. With
D = W − Q, GPTQ's recurrence is D = E·U, i.e. E = D·V for V = U⁻¹ — the upper factor of
H = V·Vᵀ, which is ONE Cholesky of the reversed matrix (J·H·J = L·Lᵀ ⇒ V = J·L·J).
Substituting gives the same algorithm in terms of V:
    w̃_j = W_j + Σ_{i<j} D_i·V_ij / V_jj,   q_j = quant(w̃_j),   D_j = W_j − q_j,
and the loss e_j = (w̃_j − q_j)·V_jj. Identical in exact arithmetic (tests check the
integers against a float64 reference); ~4× fewer factorisation FLOPs and no inverse of an
ill-conditioned matrix.

A factorisation that fails is retried with damp ×10 up to ``damp_max``; only then the
entry falls back to RTN. The path taken is returned per entry.

Group scales are *static* by default (from the original weights, before any error
feedback — llm-compressor's choice); ``dynamic_groups`` recomputes each group's scale
from the updated weights when the column loop reaches it (the reference's choice).
``benchmarks/README.md`` compares both; act-order requires static groups because the
pack-quantized layout without ``g_idx`` assumes groups of consecutive input columns.
"""
from __future__ import annotations

from contextlib import contextmanager
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
    triton_rows: int = 16       # rows per Triton program (tuning knob)
    triton_warps: int = 4
    tf32_update: bool = True    # CUDA: lazy block update in TF32 (see benchmarks/README.md)

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
    """Dead-column fix, damping with retries and the factor for a batch [B, C, C].

    Returns Ṽ = V·diag(V)⁻¹ with diag(Ṽ) replaced by diag(V) (upper, H = V·Vᵀ; zeros for
    entries that failed at every damp), dead mask [B, C], relative damp [B] (nan where
    failed) and paths. Peak memory ≈ 3 × the batch of Hessians.
    """
    b, c, _ = h.shape
    hr = h.float().flip(-1, -2)  # J·H·J (a copy: `h` stays the caller's)
    diag = hr.diagonal(dim1=-2, dim2=-1)
    dead = (diag == 0).flip(-1)
    diag[diag == 0] = 1.0
    mean_diag = diag.mean(-1)
    v = torch.zeros_like(hr)
    rel = torch.full((b,), float("nan"), dtype=torch.float64)
    paths = [PATH_RTN_FALLBACK] * b
    todo = torch.arange(b)
    damp, first = cfg.damp, True
    while len(todo) and damp <= cfg.damp_max * (1 + 1e-9):
        idx = todo.to(hr.device)
        low = hr[idx]  # advanced indexing copies: `hr` stays undamped for retries
        low.diagonal(dim1=-2, dim2=-1).add_((damp * mean_diag[idx])[:, None])
        low, info = torch.linalg.cholesky_ex(low)
        dv = low.diagonal(dim1=-2, dim2=-1).clone()
        ok = (info == 0) & torch.isfinite(low).all(-1).all(-1) & (dv > 0).all(-1)
        # Column j of V is column c−1−j of L: scale it by 1/V_jj, keep V_jj on the diagonal.
        low.div_(dv[:, None, :])
        low.diagonal(dim1=-2, dim2=-1).copy_(dv)
        ok_cpu = ok.cpu()
        ok_idx = todo[ok_cpu]
        v[ok_idx.to(hr.device)] = low[ok].flip(-1, -2)
        del low
        rel[ok_idx] = damp
        for i in ok_idx.tolist():
            paths[i] = PATH_GPTQ if first else PATH_DAMP_RETRY
        todo = todo[~ok_cpu]
        damp *= cfg.damp_growth
        first = False
    return v, dead, rel, paths


def _block_torch(w: torch.Tensor, w0: torch.Tensor, v: torch.Tensor, s_cols: torch.Tensor,
                 b0: int, b1: int, cfg: GPTQConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Column loop inside one block. ``w`` holds w̃ (updated in place), ``w0`` the original
    weights. Updates ``s_cols`` in place for dynamic groups; returns (q, D, loss)."""
    spec = cfg.spec
    w1 = w[:, :, b0:b1]
    q1 = torch.zeros_like(w1)
    d1 = torch.zeros_like(w1)
    loss = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    vb = v[:, b0:b1, b0:b1]
    for i in range(b1 - b0):
        col = b0 + i
        if cfg.dynamic_groups and col % spec.group_size == 0:
            s = group_scales(w1[:, :, i:i + spec.group_size], spec)
            s_cols[:, :, col:col + spec.group_size] = s.expand(-1, -1, spec.group_size)
        wi = w1[:, :, i]
        s = s_cols[:, :, col]
        qi = torch.clamp(wi / s, spec.qmin, spec.qmax).round()
        dq = qi * s
        e = (wi - dq) * vb[:, i, i][:, None]
        loss += (e * e).sum(-1).double()
        di = w0[:, :, col] - dq
        w1[:, :, i + 1:] += di[:, :, None] * vb[:, None, i, i + 1:]
        q1[:, :, i] = qi
        d1[:, :, i] = di
    return q1, d1, loss


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
    v, dead, rel, paths = _prepare(h, cfg)
    w.masked_fill_(dead[:, None, :], 0.0)
    w0 = w.clone()  # original (dead-zeroed) weights: D = W − Q is taken against these
    # Entries whose factorisation failed at every damp get V = I: no error feedback, so
    # the loop below degenerates to exactly RTN with the same scales (the fallback).
    failed = torch.tensor([p == PATH_RTN_FALLBACK for p in paths], device=w.device)
    if failed.any():
        v[failed] = torch.eye(cols, device=w.device)

    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    loss = torch.zeros(bsz, dtype=torch.float64, device=w.device)
    kernel = _triton_block() if (cfg.use_triton and w.is_cuda) else None
    for b0 in range(0, cols, cfg.block_size):
        b1 = min(b0 + cfg.block_size, cols)
        q1, d1, l1 = (kernel or _block_torch)(w, w0, v, s_cols, b0, b1, cfg)
        q[:, :, b0:b1] = q1
        loss += l1
        if b1 < cols:  # lazy batch update of all later columns: one batched GEMM
            with _tf32(cfg.tf32_update and w.is_cuda):
                w[:, :, b1:].baddbmm_(d1, v[:, b0:b1, b1:])

    if perm is not None:
        q = _permute_cols(q, torch.argsort(perm, dim=-1))
    elif cfg.dynamic_groups:
        scale = s_cols[:, :, ::spec.group_size].contiguous()
    return GPTQResult(q=q, scale=scale, damp=rel, path=paths,
                      dead=dead.sum(-1).cpu(), loss=loss.cpu())


@contextmanager
def _tf32(enabled: bool):
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


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
    with _tf32(True):
        num = (torch.bmm(dw, hf) * dw).sum((-1, -2)).double()
        den = (torch.bmm(w, hf) * w).sum((-1, -2)).double()
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.full_like(den, float("nan"))).cpu()

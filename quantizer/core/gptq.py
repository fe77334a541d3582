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
feedback — llm-compressor's choice, and measurably better here: benchmarks/README.md);
``dynamic_groups`` recomputes a group's scale from w̃ when the column loop reaches it.
(In this formulation w̃ at a group's start holds the feedback of earlier *blocks* only,
so dynamic scales differ slightly from the reference's; the resulting error agrees with
it within 0.1% in tests.) Act-order requires static groups: the pack-quantized layout
without ``g_idx`` assumes groups of consecutive input columns.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from requant.quantizer.core.quant import QuantSpec, group_scales

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
    lazy_block: int = 512       # columns per outer lazy update (multiple of block_size)
    cholesky_block: int = 512   # >0: blocked factorisation, batched-GEMM updates (ul_cholesky)

    def __post_init__(self) -> None:
        if self.block_size % self.spec.group_size:
            raise ValueError("block_size must be a multiple of group_size")
        if self.lazy_block % self.block_size:
            raise ValueError("lazy_block must be a multiple of block_size")
        if self.act_order and self.dynamic_groups:
            raise ValueError("act-order needs static group scales (pack-quantized has no g_idx here)")


@dataclass
class GPTQResult:
    q: torch.Tensor            # int8 [B, R, C]
    scale: torch.Tensor        # float32 [B, R, C/g] (values exact in spec.scale_dtype)
    damp: torch.Tensor         # float64 [B] relative damp used (nan for RTN fallback)
    path: list[str]            # per entry: gptq | gptq_damp_retry | rtn_fallback
    dead: torch.Tensor         # int64 [B] number of dead columns
    loss: torch.Tensor         # float64 [B] Σ e_j² = tr(ΔW H_damped ΔWᵀ)


def ul_cholesky(a: torch.Tensor, block: int = 0, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper-triangular V with V·Vᵀ = a, batched → (V, info; info ≠ 0 where a is not PD).

    This is the Cholesky factorisation in reverse order (J·a·J = L·Lᵀ, V = J·L·J), run
    blocked from the bottom-right corner so that no reversed copy is ever made. cuSOLVER
    factors large matrices one by one far below the GPU's throughput; here it only sees
    the diagonal blocks and the bulk of the work is large batched GEMMs. Only V's upper
    triangle is written: its strict lower triangle is left as garbage (GPTQ never reads it).
    """
    n = a.shape[-1]
    if block <= 0 or block >= n:
        low, info = torch.linalg.cholesky_ex(a.flip(-1, -2))
        return low.flip(-1, -2).contiguous(), info  # cuSOLVER returns column-major
    a = a if inplace else a.clone()
    info = torch.zeros(a.shape[0], dtype=torch.int32, device=a.device)
    for k in reversed(range(0, n, block)):
        e = min(k + block, n)
        low, inf = torch.linalg.cholesky_ex(a[:, k:e, k:e].flip(-1, -2))
        vkk = low.flip(-1, -2)
        info = torch.where((info == 0) & (inf > 0), inf + (n - e), info)
        a[:, k:e, k:e] = vkk
        if k > 0:
            vik = torch.linalg.solve_triangular(vkk.mT, a[:, :k, k:e], upper=False, left=False)
            a[:, :k, k:e] = vik
            vik_t = vik.mT.contiguous()
            for j in range(0, k, block):  # upper triangle only, block column by block column
                f = min(j + block, k)
                a[:, :f, j:f].baddbmm_(vik[:, :f], vik_t[:, :, j:f], alpha=-1.0)
    return a, info


def _factor(h: torch.Tensor, damp: float | torch.Tensor, cfg: GPTQConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ṽ for a batch of Hessians: V·Vᵀ = H + damp·mean(diag)·I (dead diagonals set to 1),
    V upper; columns scaled by 1/V_jj with V_jj kept on the diagonal. ``damp``: one relative
    damp, or one per entry [B].
    Returns (Ṽ, ok [B], dead [B, C]). Peak memory ≈ 2 × the batch of Hessians."""
    a = h.to(torch.float32, copy=True)
    diag = a.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    diag.masked_fill_(dead, 1.0)
    if torch.is_tensor(damp):
        damp = damp.to(a.device, torch.float32)[:, None]
    diag.add_(damp * diag.mean(-1, keepdim=True))
    v, info = ul_cholesky(a, cfg.cholesky_block, inplace=True)
    dv = v.diagonal(dim1=-2, dim2=-1).clone()
    # H is checked finite, so a failed factorisation shows in info or in the diagonal.
    ok = (info == 0) & (dv > 0).all(-1) & torch.isfinite(dv).all(-1)
    v.div_(dv[:, None, :])
    v.diagonal(dim1=-2, dim2=-1).copy_(dv)
    return v, ok, dead


def _prepare(h: torch.Tensor, cfg: GPTQConfig, damp: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Factor with damp retries (×growth up to damp_max, failing entries only). ``damp``: per
    entry relative damp [B] (default: ``cfg.damp`` for all). Returns Ṽ (identity for entries
    that failed at every damp → exact RTN), dead mask, relative damp [B] (nan where failed)
    and paths."""
    b = h.shape[0]
    v, ok, dead = _factor(h, cfg.damp if damp is None else damp, cfg)
    rel = torch.full((b,), float("nan"), dtype=torch.float64)
    cur = torch.full((b,), cfg.damp, dtype=torch.float64) if damp is None else damp.double().cpu().clone()
    ok_cpu = ok.cpu()
    rel[ok_cpu] = cur[ok_cpu]
    paths = [PATH_GPTQ if o else PATH_RTN_FALLBACK for o in ok_cpu.tolist()]
    todo = (~ok_cpu).nonzero().flatten()
    cur *= cfg.damp_growth
    while len(todo):
        todo = todo[cur[todo] <= cfg.damp_max * (1 + 1e-9)]
        if not len(todo):
            break
        # one shared damp (the default) is passed as a number: the same arithmetic as ever
        d = float(cur[todo[0]]) if damp is None else cur[todo]
        vs, oks, _ = _factor(h[todo.to(h.device)], d, cfg)
        oks = oks.cpu()
        good = todo[oks]
        v[good.to(v.device)] = vs[oks.to(vs.device)]
        rel[good] = cur[good]
        for i in good.tolist():
            paths[i] = PATH_DAMP_RETRY
        todo = todo[~oks]
        cur[todo] *= cfg.damp_growth
    failed = torch.isnan(rel).nonzero().flatten()
    if len(failed):
        v[failed.to(v.device)] = torch.eye(h.shape[-1], device=v.device)
    return v, dead, rel, paths


def _column_scale(scale: torch.Tensor, gidx: torch.Tensor | None, col: int, group: int) -> torch.Tensor:
    if gidx is None:
        return scale[:, :, col // group]
    return scale.gather(2, gidx[:, None, col:col + 1].expand(-1, scale.shape[1], 1)).squeeze(-1)


def _block_torch(w: torch.Tensor, w0: torch.Tensor, v: torch.Tensor, scale: torch.Tensor,
                 gidx: torch.Tensor | None, b0: int, b1: int, cfg: GPTQConfig,
                 q1: torch.Tensor, d1: torch.Tensor) -> torch.Tensor:
    """Column loop inside one block. ``w`` holds w̃ (updated in place), ``w0`` the original
    weights, ``gidx`` the group of each (permuted) column for act-order. Writes the block's
    integers into ``q1`` and D = W − Q into ``d1`` (views [B, R, b1−b0]) and dynamic group
    scales into ``scale``. Returns the block's loss [B]."""
    spec = cfg.spec
    w1 = w[:, :, b0:b1]
    loss = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    vb = v[:, b0:b1, b0:b1]
    for i in range(b1 - b0):
        col = b0 + i
        if cfg.dynamic_groups and col % spec.group_size == 0:
            scale[:, :, col // spec.group_size] = group_scales(w1[:, :, i:i + spec.group_size], spec)[..., 0]
        s = _column_scale(scale, gidx, col, spec.group_size)
        wi = w1[:, :, i]
        qi = torch.clamp(wi / s, spec.qmin, spec.qmax).round()
        dq = qi * s
        e = (wi - dq) * vb[:, i, i][:, None]
        loss += (e * e).sum(-1).double()
        di = w0[:, :, col] - dq
        w1[:, :, i + 1:] += di[:, :, None] * vb[:, None, i, i + 1:]
        q1[:, :, i] = qi
        d1[:, :, i] = di
    return loss


def gptq_batched(w: torch.Tensor, h: torch.Tensor, cfg: GPTQConfig = GPTQConfig(),
                 damp: torch.Tensor | None = None) -> GPTQResult:
    """GPTQ of a batch ``w`` [B, R, C] with Hessians ``h`` [B, C, C] (any positive scale);
    ``damp``: relative damp per entry [B] (default ``cfg.damp`` for every entry)."""
    spec = cfg.spec
    if w.ndim != 3 or h.ndim != 3 or h.shape != (w.shape[0], w.shape[2], w.shape[2]):
        raise ValueError(f"shape mismatch: weights {tuple(w.shape)}, Hessians {tuple(h.shape)}")
    spec.check_columns(w.shape[-1])
    if not torch.isfinite(w).all():
        raise ValueError("non-finite weights")
    if not torch.isfinite(h).all():
        raise ValueError("non-finite Hessian")
    if damp is not None and (damp.shape != (w.shape[0],) or not bool((damp >= 0).all())):
        raise ValueError(f"damp must be [{w.shape[0]}] non-negative values, got {tuple(damp.shape)}")
    return _quantize_stage(w, _factor_stage(w, h, cfg, damp), cfg)


def _factor_stage(w: torch.Tensor, h: torch.Tensor, cfg: GPTQConfig, damp: torch.Tensor | None = None) -> dict:
    """Scales, act-order permutation and the factorisation of one (sub-)batch."""
    spec = cfg.spec
    cols = w.shape[-1]
    st: dict = {"scale": group_scales(w, spec), "w0": w, "gidx": None, "perm": None}
    if cfg.act_order:  # process columns by decreasing H_ii; groups stay on original columns
        perm = torch.argsort(h.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True)
        st.update(perm=perm, w0=_permute_cols(w, perm), gidx=(perm // spec.group_size).contiguous())
        h = torch.gather(h, 1, perm[:, :, None].expand(-1, -1, cols))
        h = torch.gather(h, 2, perm[:, None, :].expand(-1, cols, -1))
    st["v"], st["dead"], st["rel"], st["paths"] = _prepare(h, cfg, damp)
    return st


def _quantize_stage(w_in: torch.Tensor, st: dict, cfg: GPTQConfig) -> GPTQResult:
    """The column loop with two-level lazy updates, given the factor stage's outputs."""
    w0, v, scale, gidx, perm = st["w0"], st["v"], st["scale"], st["gidx"], st["perm"]
    bsz, rows, cols = w0.shape
    w = w0.to(torch.float32, copy=True)  # w̃, updated in place; w0 stays the original
    ndead = st["dead"].sum(-1).cpu()
    if ndead.any():
        w.masked_fill_(st["dead"][:, None, :], 0.0)
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    loss = torch.zeros(bsz, dtype=torch.float64, device=w.device)
    # the fused kernel holds one scale per row per block: block == group (W4A16 g128)
    fused = cfg.use_triton and w.is_cuda and cfg.block_size == cfg.spec.group_size
    kernel = _triton_block() if fused else None
    # Two-level lazy updates: after each 128-column block only the rest of its super-block
    # is updated; the columns beyond get one GEMM per super-block (K = lazy_block), which
    # cuts the memory traffic of re-writing W̃'s tail by lazy_block/block_size.
    sb = max(cfg.lazy_block, cfg.block_size)
    with _tf32(cfg.tf32_update and w.is_cuda):
        for s0 in range(0, cols, sb):
            s1 = min(s0 + sb, cols)
            d_sb = torch.empty(bsz, rows, s1 - s0, dtype=torch.float32, device=w.device)
            for b0 in range(s0, s1, cfg.block_size):
                b1 = min(b0 + cfg.block_size, s1)
                d1 = d_sb[:, :, b0 - s0:b1 - s0]
                loss += (kernel or _block_torch)(w, w0, v, scale, gidx, b0, b1, cfg, q[:, :, b0:b1], d1)
                if b1 < s1:
                    w[:, :, b1:s1].baddbmm_(d1, v[:, b0:b1, b1:s1])
            if s1 < cols:
                w[:, :, s1:].baddbmm_(d_sb, v[:, s0:s1, s1:])
    if perm is not None:
        q = _permute_cols(q, torch.argsort(perm, dim=-1))
    return GPTQResult(q=q, scale=scale, damp=st["rel"], path=st["paths"],
                      dead=ndead, loss=loss.cpu())


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
        from requant.quantizer.core.gptq_triton import block_kernel
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

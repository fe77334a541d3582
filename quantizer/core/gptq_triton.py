"""Fused GPTQ in-block column loop for CUDA (Triton).

One program owns a tile of BR rows × one 128-column block of one batch entry and keeps it
in registers for the whole block: each of the 128 steps quantises a column of w̃ and feeds
D_j = W_j − q_j forward to the tile's later columns through Ṽ (see ``gptq``) — the tile
is read from and written to global memory once per block instead of once per column.
Same arithmetic and order as ``gptq._block_torch``; only for block_size == group_size (one scale
per row per block), the W4A16 g128 case: ``gptq`` falls back to the torch loop otherwise.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _round_bf16(x):
    """fp32 → nearest bf16 (ties to even), kept in fp32; explicit bit arithmetic so the
    interpreter and every GPU agree (scales are finite and non-negative)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _gptq_block_kernel(W, W0, SC, GIDX, V, Q, D, LOSS, R, C, G, b0, ncols,
                       sqb, sqr, sdb, sdr,
                       QMIN: tl.constexpr, QMAX: tl.constexpr, HALF: tl.constexpr,
                       SCALE_EPS: tl.constexpr, BLOCK: tl.constexpr, BR: tl.constexpr,
                       DYNAMIC: tl.constexpr, PER_COL_SCALE: tl.constexpr):
    pid_r = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_r * BR + tl.arange(0, BR)
    cols = tl.arange(0, BLOCK)
    rmask = rows < R
    cmask = cols < ncols
    tile = rmask[:, None] & cmask[None, :]
    row64 = rows.to(tl.int64)
    w = tl.load(W + b * R * C + row64[:, None] * C + (b0 + cols)[None, :], mask=tile, other=0.0)
    sc_rows = SC + b * R * G + row64 * G
    if DYNAMIC:  # the group's scale from w̃ at its first column (block == group)
        s = _round_bf16(tl.max(tl.abs(w), axis=1) / HALF)
        s = tl.where(s == 0.0, SCALE_EPS, s)
        tl.store(sc_rows + b0 // BLOCK, s, mask=rmask)
    elif not PER_COL_SCALE:
        s = tl.load(sc_rows + b0 // BLOCK, mask=rmask, other=1.0)
    q_t = tl.zeros((BR, BLOCK), dtype=tl.float32)
    d_t = tl.zeros((BR, BLOCK), dtype=tl.float32)
    loss = tl.zeros((BR,), dtype=tl.float32)
    vbase = V + b * C * C + b0 * C + b0
    w0row = W0 + b * R * C + row64 * C + b0
    for i in range(0, ncols):
        sel = cols[None, :] == i
        wi = tl.sum(tl.where(sel, w, 0.0), axis=1)
        if PER_COL_SCALE:
            gi = tl.load(GIDX + b * C + b0 + i)
            s = tl.load(sc_rows + gi, mask=rmask, other=1.0)
        vii = tl.load(vbase + i * C + i)
        vrow = tl.load(vbase + i * C + cols, mask=(cols > i) & cmask, other=0.0)
        x = tl.minimum(tl.maximum(wi / s, QMIN), QMAX)
        qi = tl.floor(x + 0.5)  # round half to even, as torch.round does:
        qi = tl.where(((qi - x) == 0.5) & (qi - 2.0 * tl.floor(qi * 0.5) != 0.0), qi - 1.0, qi)
        dq = qi * s
        ei = (wi - dq) * vii
        loss += ei * ei
        # Original weight of this column: L1-resident after the first column's load.
        di = tl.load(w0row + i, mask=rmask, other=0.0).to(tl.float32) - dq
        w = w + di[:, None] * vrow[None, :]
        q_t = tl.where(sel, qi[:, None], q_t)
        d_t = tl.where(sel, di[:, None], d_t)
    tl.store(Q + b * sqb + row64[:, None] * sqr + cols[None, :], q_t.to(tl.int8), mask=tile)
    tl.store(D + b * sdb + row64[:, None] * sdr + cols[None, :], d_t, mask=tile)
    tl.atomic_add(LOSS + b, tl.sum(tl.where(rmask, loss, 0.0), axis=0))


def block_kernel(w: torch.Tensor, w0: torch.Tensor, v: torch.Tensor, scale: torch.Tensor,
                 gidx: torch.Tensor | None, b0: int, b1: int, cfg,
                 q1: torch.Tensor, d1: torch.Tensor) -> torch.Tensor:
    """Drop-in for ``gptq._block_torch`` on CUDA tensors: writes ``q1``/``d1`` (column
    slices of larger buffers, unit column stride), returns the block loss [B]."""
    spec = cfg.spec
    if cfg.block_size != spec.group_size:
        raise ValueError(f"GPTQ kernel needs block_size == group_size (one scale per row per block), "
                         f"got {cfg.block_size} and {spec.group_size}")
    if not (v.is_contiguous() and scale.is_contiguous() and w.is_contiguous()
            and q1.stride(-1) == 1 and d1.stride(-1) == 1):
        raise ValueError("GPTQ kernel needs contiguous weights, factors, scales and unit column strides")
    bsz, rows, cols = w.shape
    loss = torch.zeros(bsz, dtype=torch.float32, device=w.device)
    grid = (triton.cdiv(rows, cfg.triton_rows), bsz)
    _gptq_block_kernel[grid](
        w, w0.contiguous(), scale, gidx if gidx is not None else q1, v, q1, d1, loss,
        rows, cols, scale.shape[-1], b0, b1 - b0,
        q1.stride(0), q1.stride(1), d1.stride(0), d1.stride(1),
        QMIN=float(spec.qmin), QMAX=float(spec.qmax), HALF=spec.half_range,
        SCALE_EPS=torch.finfo(spec.scale_dtype).eps, BLOCK=cfg.block_size, BR=cfg.triton_rows,
        DYNAMIC=cfg.dynamic_groups, PER_COL_SCALE=cfg.act_order, num_warps=cfg.triton_warps)
    return loss.double()

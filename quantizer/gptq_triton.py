"""Fused GPTQ in-block column loop for CUDA (Triton).

One program owns a tile of BR rows × one 128-column block of one batch entry and keeps it
in registers for the whole block: each of the 128 steps quantises a column, and spreads
its error over the tile's later columns — the tile is read from and written to global
memory once per block instead of once per column. Same arithmetic and order as
``gptq._block_torch``; used only when block_size == group_size (one scale per row per
block), which is the W4A16 g128 case.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _gptq_block_kernel(W, S, U, Q, E, LOSS, R, C, b0, ncols,
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
    base = b * R * C + rows[:, None].to(tl.int64) * C + (b0 + cols)[None, :]
    w = tl.load(W + base, mask=tile, other=0.0)
    if DYNAMIC:
        absmax = tl.max(tl.abs(w), axis=1)
        s = (absmax / HALF).to(tl.bfloat16).to(tl.float32)
        s = tl.where(s == 0.0, SCALE_EPS, s)
        tl.store(S + base, tl.broadcast_to(s[:, None], (BR, BLOCK)), mask=tile)
        s_tile = tl.broadcast_to(s[:, None], (BR, BLOCK))
    else:
        s_tile = tl.load(S + base, mask=tile, other=1.0)
    s = tl.sum(tl.where(cols[None, :] == 0, s_tile, 0.0), axis=1)
    q_t = tl.zeros((BR, BLOCK), dtype=tl.float32)
    e_t = tl.zeros((BR, BLOCK), dtype=tl.float32)
    loss = tl.zeros((BR,), dtype=tl.float32)
    ubase = U + b * C * C + b0 * C + b0
    for i in range(0, ncols):
        sel = cols[None, :] == i
        wi = tl.sum(tl.where(sel, w, 0.0), axis=1)
        if PER_COL_SCALE:
            s = tl.sum(tl.where(sel, s_tile, 0.0), axis=1)
        d = tl.load(ubase + i * C + i)
        urow = tl.load(ubase + i * C + cols, mask=(cols > i) & cmask, other=0.0)
        qi = tl.minimum(tl.maximum(libdevice.rint(wi / s), QMIN), QMAX)
        ei = (wi - qi * s) / d
        loss += ei * ei
        w = w - ei[:, None] * urow[None, :]
        q_t = tl.where(sel, qi[:, None], q_t)
        e_t = tl.where(sel, ei[:, None], e_t)
    qbase = b * R * BLOCK + rows[:, None].to(tl.int64) * BLOCK + cols[None, :]
    tl.store(Q + qbase, q_t.to(tl.int8), mask=tile)
    tl.store(E + qbase, e_t, mask=tile)
    tl.atomic_add(LOSS + b, tl.sum(tl.where(rmask, loss, 0.0), axis=0))


def block_kernel(w: torch.Tensor, u: torch.Tensor, s_cols: torch.Tensor, b0: int, b1: int, cfg,
                 rows_per_program: int = 16):
    """Drop-in for ``gptq._block_torch`` (returns q float, err, loss) on CUDA tensors."""
    spec = cfg.spec
    if cfg.block_size != spec.group_size:
        from .gptq import _block_torch
        return _block_torch(w, u, s_cols, b0, b1, cfg)
    bsz, rows, cols = w.shape
    block = cfg.block_size
    q = torch.empty(bsz, rows, block, dtype=torch.int8, device=w.device)
    err = torch.zeros(bsz, rows, block, dtype=torch.float32, device=w.device)
    loss = torch.zeros(bsz, dtype=torch.float32, device=w.device)
    grid = (triton.cdiv(rows, rows_per_program), bsz)
    _gptq_block_kernel[grid](
        w, s_cols, u, q, err, loss, rows, cols, b0, b1 - b0,
        QMIN=float(spec.qmin), QMAX=float(spec.qmax), HALF=spec.half_range,
        SCALE_EPS=torch.finfo(spec.scale_dtype).eps, BLOCK=block, BR=rows_per_program,
        DYNAMIC=cfg.dynamic_groups, PER_COL_SCALE=cfg.act_order, num_warps=4)
    # The kernel keeps the updated block in registers only; GPTQ never reads it again.
    n = b1 - b0
    return q[:, :, :n], err[:, :, :n], loss.double()

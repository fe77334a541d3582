"""The MoE output of an MTP block (routed experts + shared expert), for evaluating drafts.

Precision follows vLLM's bf16 path: each expert's SwiGLU and down projection on bf16 operands
(``hessian.swiglu_intermediate``), the routing-weighted sum over the top-k in fp32.
"""
from __future__ import annotations

import torch

from requant.quantizer.core.hessian import swiglu_intermediate


def routed_output(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                  w3: torch.Tensor, limit: float | None) -> torch.Tensor:
    """``Σ_k g_k · E_{ids_k}(x)`` [T, H] fp32 for x [T, H] bf16, ids/weights [T, k], stacked
    experts w1/w3 [E, I, H], w2 [E, H, I] (any device: moved to x's per expert)."""
    T, k = ids.shape
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w1.shape[0]).tolist()
    tok, g = order // k, weights.reshape(-1)[order].float()
    start = 0
    for e, n in enumerate(counts):
        if n:
            t = tok[start:start + n]
            a = swiglu_intermediate(x.index_select(0, t), w1[e].to(x.device), w3[e].to(x.device), limit)
            y = a @ w2[e].to(x.device, a.dtype).T
            out.index_add_(0, t, y.float() * g[start:start + n, None])
            start += n
    return out


def shared_output(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                  limit: float | None) -> torch.Tensor:
    """The shared expert's output [T, H] in x's dtype."""
    return swiglu_intermediate(x, w1, w3, limit) @ w2.to(x.dtype).T

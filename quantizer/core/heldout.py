"""Held-out quality of quantised experts: the relative output error
tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) on the Hessians H of the held-out sequences (``partition.py``),
which GPTQ never saw — for the tensors as written and for round-to-nearest.

The in-sample figure (``TensorRecord.err_gptq``, on the calibration Hessians GPTQ fitted)
flatters GPTQ when an expert saw few tokens; the held-out one does not. A tensor whose
held-out error is not below RTN's is flagged: there GPTQ did no good. ``tensor_errors`` is
the building block for comparing other quantisations on the same held-out Hessians.
"""
from __future__ import annotations

from typing import Callable

import torch

from requant.quantizer.core.gptq import relative_output_error
from requant.quantizer.core.hessian import HessianSet, PackedHessians
from requant.quantizer.core.pack import unpack_int32
from requant.quantizer.core.quant import QuantSpec, dequantize, rtn


def tensor_errors(w: torch.Tensor, wq: torch.Tensor, h: torch.Tensor, spec: QuantSpec = QuantSpec()
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(error of ``wq``, error of RTN(w)) per batch entry on Hessians ``h``: ``w``, ``wq``
    [B, R, C], ``h`` [B, C, C] (sums or means: the ratio is the same). NaN where tr(W H Wᵀ) = 0
    (no held-out tokens)."""
    w = w.float()
    wr = dequantize(*rtn(w, spec), spec)
    return relative_output_error(w, wq, h), relative_output_error(w, wr, h)


def written_weights(tensors: dict[str, torch.Tensor], name: str, spec: QuantSpec = QuantSpec(),
                    device: str | torch.device = "cpu") -> torch.Tensor:
    """fp32 weights [out, in] a compressed-tensors ``pack-quantized`` tensor holds: its integers
    × group scales, in fp32 as the in-sample figure dequantises (decoded on ``device``)."""
    out_f, in_f = (int(v) for v in tensors[f"{name}.weight_shape"])
    q = unpack_int32(tensors[f"{name}.weight_packed"].to(device), spec.num_bits)[:, :in_f]
    return dequantize(q, tensors[f"{name}.weight_scale"].to(device).float(), spec)[:out_f]


def heldout_records(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor, tensors: dict[str, torch.Tensor],
                    h_in: HessianSet | PackedHessians, h_mid: HessianSet | PackedHessians, name_fn: Callable[[int, str], str],
                    rows: dict[int, int] | None = None, batch: int = 4, device: str | torch.device = "cpu",
                    spec: QuantSpec = QuantSpec()) -> dict[tuple[int, str], dict]:
    """Per (expert, proj) of the experts of ``h_in``: held-out tokens, error of the written
    tensor and of RTN, and whether the written one is not below RTN (None without tokens).
    ``rows`` maps expert → row of the stacked weights (default: the expert id)."""
    r = (lambda e: e) if rows is None else rows.__getitem__
    experts = h_in.experts.tolist()
    out: dict[tuple[int, str], dict] = {}
    for s in range(0, len(experts), batch):
        local = list(range(s, min(s + batch, len(experts))))
        ids = [experts[i] for i in local]
        h = {id(hs): hs.sums(local, device) for hs in (h_in, h_mid)}  # unpacked once per batch
        for proj, stack, hs in (("w1", w1, h_in), ("w3", w3, h_in), ("w2", w2, h_mid)):
            w = torch.stack([stack[r(e)] for e in ids]).to(device).float()
            wq = torch.stack([written_weights(tensors, name_fn(e, proj), spec, device) for e in ids])
            err_q, err_r = tensor_errors(w, wq, h[id(hs)], spec)
            for j, e in enumerate(ids):
                q, rt = float(err_q[j]), float(err_r[j])
                known = q == q and rt == rt
                out[(e, proj)] = {"tokens_heldout": int(hs.count[local[j]]),
                                  "err_gptq_heldout": q if known else None,
                                  "err_rtn_heldout": rt if known else None,
                                  "heldout_not_below_rtn": (q >= rt) if known else None}
    return out

"""Symmetric INT group quantisation with compressed-tensors' exact scale convention.

compressed-tensors (the format vLLM loads) defines, for a symmetric signed ``num_bits``
integer: ``scale = max(|min(w, 0)|, |max(w, 0)|) / ((qmax - qmin) / 2)`` — for INT4 that is
``absmax / 7.5`` — stored in the weight's dtype, a zero scale replaced by that dtype's eps,
and ``q = round_half_even(clamp(w / scale, qmin, qmax))``. Everything that produces integers
here (RTN and GPTQ) goes through these two functions so the packed checkpoint decodes to
exactly the weights our error numbers describe.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantSpec:
    """What the integers and scales look like on disk (W4A16 g128 symmetric by default)."""

    num_bits: int = 4
    group_size: int = 128
    scale_dtype: torch.dtype = torch.bfloat16

    @property
    def qmin(self) -> int:
        return -(1 << (self.num_bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.num_bits - 1)) - 1

    @property
    def half_range(self) -> float:
        return (self.qmax - self.qmin) / 2.0

    def check_columns(self, columns: int) -> None:
        if columns % self.group_size:
            raise ValueError(
                f"group size {self.group_size} does not divide the input dimension {columns}"
            )


def group_scales(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per (row, group) scales of ``w[..., rows, cols]`` → ``[..., rows, cols/group]``.

    Returned in float32 but holding values exactly representable in ``spec.scale_dtype``:
    the scale that will be stored is the scale GPTQ/RTN must quantise with.
    """
    spec.check_columns(w.shape[-1])
    g = w.float().unflatten(-1, (w.shape[-1] // spec.group_size, spec.group_size))
    absmax = torch.maximum(g.amax(-1).clamp(min=0), (-g.amin(-1)).clamp(min=0))
    return finalize_scale(absmax / spec.half_range, spec)


def finalize_scale(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round to the stored dtype and replace zeros by its eps (compressed-tensors' rule)."""
    s = scale.to(spec.scale_dtype)
    s = torch.where(s == 0, torch.tensor(torch.finfo(spec.scale_dtype).eps, dtype=s.dtype, device=s.device), s)
    return s.float()


def expand_groups(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """[..., rows, groups] → [..., rows, groups*group_size] (one scale per column)."""
    return scale.repeat_interleave(spec.group_size, dim=-1)


def quantize(w: torch.Tensor, scale_cols: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integers (float dtype, exact) for weights and per-column scales of the same shape."""
    return torch.clamp(w / scale_cols, spec.qmin, spec.qmax).round()


def dequantize(q: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """float32 weights from integers [..., R, C] and group scales [..., R, C/g]."""
    return q.float() * expand_groups(scale.float(), spec)


def rtn(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (int8 q, float32 group scales). Baseline and last-resort fallback."""
    scale = group_scales(w, spec)
    q = quantize(w.float(), expand_groups(scale, spec), spec)
    return q.to(torch.int8), scale

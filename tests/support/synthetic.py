"""Synthetic MoE calibration data that looks like real activations (not iid noise):
correlated channels with a decaying spectrum (ill-conditioned Hessians), a few
heavy outlier channels, and skewed per-expert token counts. Used by the demo, the
tests and the benchmarks."""
from __future__ import annotations

import torch


def correlated_activations(tokens: int, dim: int, gen: torch.Generator, decay: float = 3.0,
                           device: str | torch.device = "cpu", dtype=torch.float32) -> torch.Tensor:
    """[tokens, dim] with singular values decaying over `decay` decades and outlier channels."""
    mix = torch.randn(dim, dim, generator=gen) / dim ** 0.5
    spectrum = torch.logspace(0, -decay, dim)
    basis = (mix * spectrum[None, :]).to(device)
    z = torch.randn(tokens, dim, generator=gen).to(device)
    x = z @ basis.T
    outliers = torch.randperm(dim, generator=gen)[: max(1, dim // 128)].to(device)
    x[:, outliers] *= 20.0
    return x.to(dtype)


def skewed_counts(experts: int, mean: float, gen: torch.Generator, sigma: float = 1.2,
                  minimum: int = 0) -> torch.Tensor:
    """Log-normal token counts per expert (the seed's were min 430, mean 11k, max 175k)."""
    raw = torch.exp(torch.randn(experts, generator=gen) * sigma)
    counts = (raw / raw.mean() * mean).round().long()
    return counts.clamp(min=minimum)


def expert_weights(experts: int, out_f: int, in_f: int, gen: torch.Generator,
                   dtype=torch.bfloat16) -> torch.Tensor:
    """[experts, out, in] weights with a few large-magnitude columns, as trained FFNs have."""
    w = torch.randn(experts, out_f, in_f, generator=gen) * (in_f ** -0.5)
    cols = torch.randperm(in_f, generator=gen)[: max(1, in_f // 64)]
    w[:, :, cols] *= 4.0
    return w.to(dtype)

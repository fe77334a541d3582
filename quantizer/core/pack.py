"""compressed-tensors ``pack-quantized`` tensors and config entries for W4A16.

On disk, per quantised Linear ``<prefix>``: ``<prefix>.weight_packed`` int32 [out, in/8]
(signed INT4 + 8, eight per int32, least-significant nibble = lowest input column),
``<prefix>.weight_scale`` [out, in/group] in the model dtype, ``<prefix>.weight_shape``
int64 [2]. No zero point (symmetric), no ``.weight``. Tests hold this byte-identical to
compressed-tensors' own ``PackedQuantizationCompressor``.
"""
from __future__ import annotations

import torch

from requant.quantizer.core.quant import QuantSpec


def pack_int32(q: torch.Tensor, num_bits: int = 4) -> torch.Tensor:
    """Pack signed ints [..., rows, cols] (cols % (32/num_bits) == 0) into int32 [..., rows, cols*bits/32]."""
    per_word = 32 // num_bits
    if q.shape[-1] % per_word:
        raise ValueError(f"input dimension {q.shape[-1]} is not a multiple of {per_word}")
    offset = 1 << (num_bits - 1)
    u = (q.to(torch.int32) + offset).unflatten(-1, (q.shape[-1] // per_word, per_word))
    shifts = torch.arange(per_word, dtype=torch.int32, device=q.device) * num_bits
    # Sum of disjoint bit fields == OR; int32 wrap-around gives the high nibble's sign bit.
    return (u << shifts).sum(-1, dtype=torch.int32)


def unpack_int32(packed: torch.Tensor, num_bits: int = 4) -> torch.Tensor:
    """Inverse of :func:`pack_int32` → int8 [..., rows, cols]."""
    per_word = 32 // num_bits
    shifts = torch.arange(per_word, dtype=torch.int32, device=packed.device) * num_bits
    u = (packed.unsqueeze(-1) >> shifts) & ((1 << num_bits) - 1)
    return (u - (1 << (num_bits - 1))).flatten(-2).to(torch.int8)


def packed_tensors(prefix: str, q: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> dict[str, torch.Tensor]:
    """The three tensors compressed-tensors writes for one quantised weight [out, in]."""
    if q.ndim != 2:
        raise ValueError(f"{prefix}: expected a 2-D integer weight, got shape {tuple(q.shape)}")
    out_f, in_f = q.shape
    if scale.shape != (out_f, in_f // spec.group_size):
        raise ValueError(f"{prefix}: scale shape {tuple(scale.shape)} does not match weight {tuple(q.shape)}")
    return {
        f"{prefix}.weight_packed": pack_int32(q, spec.num_bits).contiguous(),
        f"{prefix}.weight_scale": scale.to(spec.scale_dtype).contiguous(),
        f"{prefix}.weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }


def w4a16_config_group(targets: list[str], spec: QuantSpec, actorder: str | None = None) -> dict:
    """A ``config_groups`` entry for compressed-tensors' ``quantization_config``."""
    return {
        "targets": targets,
        "weights": {
            "num_bits": spec.num_bits,
            "type": "int",
            "symmetric": True,
            "strategy": "group",
            "group_size": spec.group_size,
            "dynamic": False,
            "actorder": actorder,
            "observer": "minmax",
            "observer_kwargs": {},
            "block_structure": None,
        },
        "input_activations": None,
        "output_activations": None,
        "format": "pack-quantized",
    }

"""How a worker's packed tensors travel back to the driver: one uint8 buffer and a table of
(name, dtype, shape, bytes) — one shared-memory segment through a process queue, or one numpy
array through Ray's object store, instead of thousands of tensors."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FlatTensors:
    meta: list[tuple[str, torch.dtype, tuple[int, ...], int]]   # name, dtype, shape, bytes; names sorted
    data: object                                                # uint8 torch.Tensor (numpy array for Ray)


def flatten(tensors: dict[str, torch.Tensor]) -> FlatTensors:
    names = sorted(tensors)
    parts = [tensors[n].contiguous().reshape(-1).view(torch.uint8) for n in names]
    meta = [(n, tensors[n].dtype, tuple(tensors[n].shape), p.numel()) for n, p in zip(names, parts)]
    return FlatTensors(meta, torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8))


def unflatten(flat: FlatTensors) -> dict[str, torch.Tensor]:
    out, off = {}, 0
    for n, dtype, shape, nbytes in flat.meta:
        out[n] = flat.data[off:off + nbytes].view(dtype).reshape(shape)
        off += nbytes
    return out

"""safetensors written straight from the tensors' memory: names sorted, data 8-byte aligned,
the same bytes for the same tensors."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
              torch.float8_e8m0fnu: "F8_E8M0", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None,
                      durable: bool = True) -> None:
    """A safetensors file written straight from the tensors' memory (no serialised copy of
    gigabytes), names sorted, deterministic bytes; fsynced when ``durable``."""
    names = sorted(tensors)
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    off = 0
    for n in names:
        t = tensors[n]
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"{n}: dtype {t.dtype} cannot be stored in safetensors")
        size = t.numel() * t.element_size()
        header[n] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + size]}
        off += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for n in names:
            t = tensors[n].detach().cpu().contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        if durable:
            f.flush()
            os.fsync(f.fileno())


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()

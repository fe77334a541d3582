"""MTP master weights: the ``mtp.0.*`` (DeepSeek-V4) or ``model.layers.{n}.*`` (DeepSeek-V3)
tensors of a checkpoint, dequantised to bf16 — and the checkpoint files under them (safetensors
headers checked, the index against its shards: ``tensor_files``).

Formats on disk:
* BF16/F32 tensors pass through.
* FP8 E4M3 linears with one scale per 128×128 block, the scale named ``.scale`` (upstream),
  ``.weight_scale_inv`` (vLLM/HF) or ``.weight_scale``, stored as E8M0 (2^(byte−127)), uint8
  E8M0 bytes, or F32: ``W = w · s`` broadcast over blocks.
* MXFP4 routed experts: int8 bytes holding two E2M1 codes (low nibble = even input column),
  one E8M0 scale per 32 inputs: ``W[o, i] = LUT[code] · 2^(s[o, i//32] − 127)``.
A checkpoint whose ``mtp.*`` holds DSpark stages instead of a classic MTP layer is refused.

A damaged file (a cut shard, a header that does not parse or does not cover the file, an
index naming a shard that is not there or a tensor its shard lacks, JSON that does not
parse) is a ``DamagedInputError`` naming the file. Flipped bytes inside tensor data cannot
be found: safetensors carries no checksum (the manifest records what was read).
"""
from __future__ import annotations

import json
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from requant.storage.schema import DamagedInputError

SCALE_SUFFIXES = (".scale", ".weight_scale_inv", ".weight_scale")
_FP4_LUT = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
_DSPARK_MARKERS = ("main_proj", "confidence_head", "dspark")


def check_not_dspark(names, where: str) -> None:
    """Refuse a checkpoint whose tensor names or config keys ``names`` show DSpark stages."""
    found = next((n for n in names if any(m in n for m in _DSPARK_MARKERS)), None)
    if found is not None:
        raise ValueError(f"{where}: {found} — this checkpoint revision ships DSpark stages under mtp.*, not a "
                         "classic MTP layer; requant quantises classic MTP layers only")


def e8m0_to_float(s: torch.Tensor) -> torch.Tensor:
    """E8M0 scales (float8_e8m0fnu, their uint8 bytes, or already float) → float32."""
    if s.dtype == torch.float8_e8m0fnu:
        s = s.view(torch.uint8)
    if s.dtype == torch.uint8:
        if (s == 255).any():
            raise ValueError("E8M0 scale 0xFF (NaN) in checkpoint")
        # 2^(b−127) built from its bits (exact on every device; exp2 need not be): the byte is
        # the float32 exponent field, and b = 0 is the subnormal 2^-127.
        bits = s.to(torch.int32) << 23
        return torch.where(s == 0, torch.full_like(bits, 1 << 22), bits).view(torch.float32)
    return s.float()


def dequant_fp8_block(w: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    out_f, in_f = w.shape
    s = e8m0_to_float(scale)
    if s.shape != (-(-out_f // block), -(-in_f // block)):
        raise ValueError(f"FP8 scale shape {tuple(s.shape)} does not tile weight {tuple(w.shape)} in {block}×{block} blocks")
    s = s.repeat_interleave(block, 0).repeat_interleave(block, 1)[:out_f, :in_f]
    return (w.float() * s).to(torch.bfloat16)


def dequant_mxfp4(packed: torch.Tensor, scale: torch.Tensor, group: int = 32) -> torch.Tensor:
    """int8 [out, in/2] (two E2M1 codes per byte, low nibble first) + E8M0 [out, in/32]."""
    b = packed.view(torch.uint8)
    codes = torch.stack([b & 0x0F, b >> 4], dim=-1).flatten(-2).long()  # [out, in]
    s = e8m0_to_float(scale)
    if s.shape != (codes.shape[0], codes.shape[1] // group):
        raise ValueError(f"MXFP4 scale shape {tuple(s.shape)} does not match weight [{codes.shape[0]}, {codes.shape[1]}]")
    return (_FP4_LUT.to(codes.device)[codes] * s.repeat_interleave(group, 1)).to(torch.bfloat16)


def read_json(path: Path, what: str = "JSON file") -> dict:
    """A JSON object from ``path``; a file that does not parse is a ``DamagedInputError`` naming it."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedInputError(f"{path}: {what} does not parse ({e})") from None
    if not isinstance(data, dict):
        raise DamagedInputError(f"{path}: {what} holds a {type(data).__name__}, not an object")
    return data


_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U16": 2, "U32": 4, "U64": 8}


def read_header(path: Path) -> dict:
    """The tensor entries of a safetensors file's header (name → dtype, shape, data_offsets),
    checked as safetensors checks them: the header parses and its tensors cover the data
    that follows exactly (a cut or padded file, a damaged header is an error naming it)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if size == 0:
            raise DamagedInputError(f"{path}: empty file, not a safetensors shard")
        if n < 2 or 8 + n > size:
            raise DamagedInputError(f"{path}: not a safetensors file, or cut short (header length "
                                    f"{n if n >= 0 else '?'}, file {size} bytes)")
        blob = f.read(n)
    try:
        head = json.loads(blob.decode("utf-8"))
        if not isinstance(head, dict):
            raise ValueError("the header is not an object")
    except (UnicodeDecodeError, ValueError) as e:
        raise DamagedInputError(f"{path}: safetensors header damaged ({e})") from None
    head.pop("__metadata__", None)
    spans = []
    for name, e in head.items():
        ok = (isinstance(e, dict) and isinstance(e.get("dtype"), str) and isinstance(e.get("shape"), list)
              and all(type(d) is int and d >= 0 for d in e["shape"]) and isinstance(e.get("data_offsets"), list)
              and len(e["data_offsets"]) == 2 and all(type(o) is int for o in e["data_offsets"]))
        if ok:
            a, b = e["data_offsets"]
            numel = 1
            for d in e["shape"]:
                numel *= d
            size_ok = e["dtype"] not in _ST_SIZES or b - a == numel * _ST_SIZES[e["dtype"]]  # sub-byte types: skip
            ok = 0 <= a <= b and size_ok
        if not ok:
            raise DamagedInputError(f"{path}: safetensors header damaged (entry {name!r}: {e!r:.200})")
        spans.append((a, b))
    end = 0
    for a, b in sorted(spans):
        if a != end:
            raise DamagedInputError(f"{path}: safetensors header damaged (tensor data not contiguous at byte {a})")
        end = b
    if end != size - 8 - n:
        raise DamagedInputError(f"{path}: {'cut short' if end > size - 8 - n else 'longer than its header says'}: "
                                f"the header covers {end} bytes of tensor data, the file holds {size - 8 - n}")
    return head


def open_tensors(path: Path):
    """``safe_open`` with safetensors' errors as a ``DamagedInputError`` naming the file."""
    try:
        return safe_open(str(path), "pt")
    except SafetensorError as e:
        raise DamagedInputError(f"{path}: unreadable safetensors file ({e})") from None


def read_index(index: Path) -> tuple[dict, dict[str, dict]]:
    """A checkpoint's ``model.safetensors.index.json`` and the headers of the shards it names,
    checked: a weight_map of names → files, every file there, every listed tensor in its file."""
    doc = read_json(index, "checkpoint index")
    wm = doc.get("weight_map")
    if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
        raise DamagedInputError(f"{index}: no weight_map of tensor names → shard files")
    missing = sorted({f for f in wm.values() if not (index.parent / f).is_file()})
    if missing:
        raise DamagedInputError(f"{index} names shards that are not there: {', '.join(missing[:3])}")
    heads = {f: read_header(index.parent / f) for f in sorted(set(wm.values()))}
    wrong = sorted(k for k, f in wm.items() if k not in heads[f])
    if wrong:
        raise DamagedInputError(f"{index} maps {wrong[0]} to {wm[wrong[0]]}, which does not hold it "
                                f"({len(wrong)} such entries): the index or the shard is damaged or from "
                                "another checkpoint")
    return doc, heads


def tensor_files(path: Path) -> dict[str, Path]:
    """tensor name → file, from a checkpoint directory (index or every shard) or one shard;
    every shard's header checked, and the index against the shards."""
    if path.is_file():
        return {k: path for k in read_header(path)}
    index = path / "model.safetensors.index.json"
    if index.exists():
        wm = read_index(index)[0]["weight_map"]
        return {k: path / v for k, v in wm.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors files")
    out = {}
    for p in files:
        out.update({k: p for k in read_header(p)})
    return out


def load_mtp_weights(path: str | Path, prefix: str,
                     device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """The MTP layer's tensors under ``prefix`` (``arch.MTPSpec.prefix``; names relative to it),
    dequantised to bf16 where quantised, on ``device`` (default CPU). On a GPU the stored bytes
    move there and are dequantised there: MXFP4 experts cross PCIe at a quarter of their bf16
    size, and the products are exact (E4M3 or E2M1 × a power of two), so the weights are the
    same bits as on the CPU."""
    path = Path(path)
    where = tensor_files(path)
    names = sorted(k for k in where if k.startswith(prefix))
    if not names:
        raise ValueError(f"{path}: no tensors under {prefix!r} — the checkpoint has no MTP layer "
                         "(was it saved by a tool that drops mtp.*?)")
    check_not_dspark(names, str(path))
    scales = {k for k in names if k.endswith(SCALE_SUFFIXES)}
    local = threading.local()  # one safetensors handle per file and reader thread

    def get(name: str) -> torch.Tensor:
        handles = local.__dict__.setdefault("handles", {})
        p = where[name]
        if p not in handles:
            handles[p] = open_tensors(p)
        t = handles[p].get_tensor(name)
        return t if device is None else t.to(device)

    def load(name: str) -> torch.Tensor:
        t = get(name)
        if t.dtype not in (torch.float8_e4m3fn, torch.int8):
            return t
        base = name.removesuffix(".weight")
        sname = next((base + s for s in SCALE_SUFFIXES if base + s in where), None)
        if sname is None:
            raise ValueError(f"{path}: {name} is {t.dtype} but has no scale ({', '.join(base + s for s in SCALE_SUFFIXES)})")
        s = get(sname)
        return dequant_fp8_block(t, s) if t.dtype == torch.float8_e4m3fn else dequant_mxfp4(t, s)

    # Several reader threads: 768 expert tensors (13 GB at DSV4 scale) are copied out of the
    # page cache and across PCIe one by one otherwise.
    wanted = [n for n in names if n not in scales]
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return {name[len(prefix):]: t for name, t in zip(wanted, pool.map(load, wanted))}

"""The base checkpoint's files: read and checked (config, index, every shard's header against
the index, both ways), then placed in the output — hard-linked (copied across file systems),
written without the MTP tensors a shard still holds, or left out when it holds nothing else;
the union index; the tokenizer and other side files."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from requant.quantizer.mtp.arch import MTPSpec, check_config
from requant.quantizer.mtp.weights import open_tensors, read_index, read_json
from requant.quantizer.stage.safetensors_io import tensor_bytes, write_safetensors
from requant.storage.schema import DamagedInputError

INDEX = "model.safetensors.index.json"


def read_base(base: Path) -> tuple[dict, dict]:
    """(config, index) of the base checkpoint; clear errors for what the union needs."""
    if not base.is_dir():
        raise FileNotFoundError(f"base checkpoint {base} is not a directory")
    cfg_file, index_file = base / "config.json", base / INDEX
    if not cfg_file.exists():
        raise FileNotFoundError(f"base checkpoint {base} has no config.json")
    if not index_file.exists():
        raise FileNotFoundError(f"base checkpoint {base} has no {INDEX}: the MTP shard is added through the "
                                "index; re-save the base sharded (safetensors with an index)")
    # Index and shards must agree both ways: the shards are linked into the output as they are,
    # and vLLM loads every tensor of every listed file.
    index, heads = read_index(index_file)
    wm = index["weight_map"]
    for f, head in heads.items():
        extra = sorted(n for n in head if wm.get(n) != f)
        if extra:
            raise DamagedInputError(f"{base / f}: holds {len(extra)} tensors {index_file.name} does not place in it "
                                    f"(first {extra[0]}): the shard or the index is from another checkpoint")
    return check_config(read_json(cfg_file, "checkpoint config"), str(cfg_file)), index


def check_base_matches(spec: MTPSpec, base_config: dict, master_config: dict, where: str = "") -> None:
    """The base must be the same model as the master (the MTP layer plugs into it).
    ``where``: the two config files, for the message."""
    for key in ("hidden_size", "n_routed_experts", "num_hidden_layers", "moe_intermediate_size", "hc_mult"):
        a, b = master_config.get(key), base_config.get(key)
        if a is not None and b is not None and a != b:
            raise ValueError(f"base config {key} = {b!r} but master config {key} = {a!r}: not the same model"
                             + (f" ({where})" if where else ""))


def link_or_copy(src: Path, dst: Path) -> str:
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:
        shutil.copy2(src, dst)
        return "copy"


def place_base_shard(src: Path, dst: Path, header: dict, prefix: str, durable: bool) -> str:
    """A base shard in the output: hard link (or copy) when it holds no MTP tensor; left out
    when it holds nothing else; else a filtered copy without them — vLLM loads every tensor
    of every listed file, so a stale MTP tensor must not stay in one. The base is never
    modified. Returns "hardlink" | "copy" | "filtered" | "dropped"."""
    mtp = [n for n in header if n.startswith(prefix)]
    if not mtp:
        return link_or_copy(src, dst)
    if len(mtp) == len(header):
        return "dropped"
    with open_tensors(src) as f:
        keep = {n: f.get_tensor(n) for n in header if not n.startswith(prefix)}
        meta = f.metadata()
    write_safetensors(dst, keep, metadata=meta, durable=durable)
    return "filtered"


def union_index(base_index: dict, base_sizes: dict[str, int], prefix: str, shard: str,
                shard_tensors: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """Base weight_map without the MTP prefix, plus every shard tensor → ``shard``."""
    wm = base_index["weight_map"]
    dropped = sorted(n for n in wm if n.startswith(prefix))
    out = {n: f for n, f in wm.items() if not n.startswith(prefix)}
    clash = [n for n in shard_tensors if n in out]
    if clash:
        raise ValueError(f"MTP shard tensor {clash[0]} already in the base index outside {prefix!r}")
    out.update({n: shard for n in shard_tensors})
    total = sum(base_sizes.get(n, 0) for n in out if out[n] != shard) + sum(map(tensor_bytes, shard_tensors.values()))
    meta = dict(base_index.get("metadata") or {})
    meta["total_size"] = total
    return {"metadata": meta, "weight_map": dict(sorted(out.items()))}, dropped


def copy_side_files(base: Path, out: Path, skip: set[str]) -> list[str]:
    """Tokenizer, generation config, templates… every top-level non-weight file of the base."""
    copied = []
    for p in sorted(base.iterdir()):
        if p.is_file() and p.name not in skip and not p.name.endswith((".safetensors", ".bin", ".pt", ".pth")):
            shutil.copy2(p, out / p.name)
            copied.append(p.name)
    return copied

"""Assemble the quantised MTP shard into a checkpoint that drops into the base model.

Output directory (built in a temp dir beside ``out`` and renamed into place by the stage):

* ``model-mtp-w4a16.safetensors`` — the routed MTP experts packed W4A16 under the base
  checkpoint's expert naming (``MTPSpec.expert_name`` + ``.weight_packed|.weight_scale|
  .weight_shape``), and every other MTP tensor of the master passed through byte for byte:
  BF16/FP32 as they are; an FP8 block linear that a base FP8 block group serves (vLLM builds
  it FP8) keeps its bytes, its scale as float32 under the base checkpoint's name for it
  (upstream DSV4 ``.scale``, vLLM/HF ``.weight_scale_inv``, compressed-tensors
  ``.weight_scale``); any other FP8 linear is dequantised to BF16 (vLLM builds it
  unquantised) and listed in ``ignore``.
* the base shards, hard-linked (copied across file systems), never modified; a base shard
  that holds MTP tensors (a base that kept its MTP layer) is written filtered instead, or
  left out when it holds nothing else, since vLLM loads every tensor of every listed file;
* ``model.safetensors.index.json`` — the union: every base tensor outside the MTP prefix
  where it was, every MTP tensor in the new shard, each name exactly once;
* ``config.json`` — the base config with ``quantization_config`` merged: a W4A16 group whose
  targets are the MTP routed experts (placed first, so vLLM's first-match picks it), the
  MTP's unquantised linears added to ``ignore`` under the checkpoint names and vLLM's; the
  base's groups and ignores kept; computed and checked before anything is written;
* tokenizer / generation files of the base, copied.

This module builds the MTP shard's contents and writes the whole; ``base_files`` reads the
base and places its files, ``quant_config`` merges and checks the config, ``safetensors_io``
writes the shard.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from requant.quantizer.core.quant import QuantSpec
from requant.quantizer.mtp.arch import MTPSpec
from requant.quantizer.mtp.weights import (SCALE_SUFFIXES, tensor_files, dequant_fp8_block, e8m0_to_float, open_tensors,
                                           read_header)
from requant.quantizer.stage.base_files import INDEX, copy_side_files, place_base_shard, union_index
from requant.quantizer.stage.quant_config import expert_modules, loads_fp8_block, merge_quant_config, mtp_linear_modules
from requant.quantizer.stage.safetensors_io import write_safetensors

SCALE_CONVENTIONS = ("auto", "keep", ".scale", ".weight_scale_inv", ".weight_scale")
PACKED_SUFFIXES = (".weight_packed", ".weight_scale", ".weight_shape")


@dataclass(frozen=True)
class AssembleConfig:
    shard_name: str = "model-mtp-w4a16.safetensors"
    fp8_scale: str = "auto"          # auto: the base's convention (.weight_scale_inv / .scale), else keep
    group_name: str = "group_mtp_experts"
    spec: QuantSpec = QuantSpec()
    actorder: str | None = None      # "weight" when GPTQ ran with act-order

    def __post_init__(self):
        if self.fp8_scale not in SCALE_CONVENTIONS:
            raise ValueError(f"fp8_scale must be one of {SCALE_CONVENTIONS}, got {self.fp8_scale!r}")


# -- the MTP shard -----------------------------------------------------------------------

def resolve_fp8_scale(cfg: AssembleConfig, base_names: list[str], fp8_modules: set[str] | None = None) -> str:
    """The scale suffix FP8 pass-through tensors get ("keep" = as in the master): the one the
    base's FP8 linears (``fp8_modules``, when known) carry — compressed-tensors FP8 names it
    ``.weight_scale``, DeepSeek/vLLM ``.weight_scale_inv``, upstream ``.scale``."""
    if cfg.fp8_scale != "auto":
        return cfg.fp8_scale
    if fp8_modules is not None:
        names = set(base_names)
        for suffix in (".weight_scale_inv", ".scale", ".weight_scale"):
            if any(m + suffix in names for m in fp8_modules):
                return suffix
        return "keep"
    if any(n.endswith(".weight_scale_inv") for n in base_names):
        return ".weight_scale_inv"
    if any(n.endswith(".scale") for n in base_names):
        return ".scale"
    return "keep"


def passthrough_tensors(master: Path, spec: MTPSpec, scale_to: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The master's MTP tensors other than the routed experts, raw (no dequantisation),
    FP8 scales renamed to ``scale_to``. Returns (tensors, names of FP8 linear modules)."""
    where = tensor_files(master)
    experts = expert_modules(spec)
    names = sorted(n for n in where if n.startswith(spec.prefix) and n.rsplit(".", 1)[0] not in experts)
    out: dict[str, torch.Tensor] = {}
    fp8_modules: list[str] = []
    handles: dict[Path, object] = {}
    try:
        for n in names:
            p = where[n]
            if p not in handles:
                handles[p] = open_tensors(p)
            out[n] = handles[p].get_tensor(n)
    finally:
        handles.clear()
    for n in list(out):
        if n.endswith(".weight") and out[n].dtype == torch.float8_e4m3fn:
            module = n[: -len(".weight")]
            fp8_modules.append(module)
            scale = next((module + s for s in SCALE_SUFFIXES if module + s in out), None)
            if scale is None:
                raise ValueError(f"{master}: FP8 tensor {n} has no scale ({', '.join(module + s for s in SCALE_SUFFIXES)})")
            if scale_to != "keep" and not scale.endswith(scale_to):
                out[module + scale_to] = out.pop(scale)
    return out, fp8_modules


def settle_fp8(tensors: dict[str, torch.Tensor], fp8_modules: list[str], served: set[str]) -> list[str]:
    """Put each FP8 pass-through module (of ``tensors``, in place) in the form vLLM will build it:
    ``served`` ones stay FP8 with their block scale as float32 (vLLM's compressed-tensors FP8
    layers hold it so; E8M0 powers of two convert exactly); the others are dequantised to BF16
    and lose their scale, since vLLM builds them unquantised. Returns the dequantised ones."""
    dequantised = []
    for m in fp8_modules:
        scale = next(m + s for s in SCALE_SUFFIXES if m + s in tensors)
        if m in served:
            tensors[scale] = e8m0_to_float(tensors[scale])
        else:
            tensors[m + ".weight"] = dequant_fp8_block(tensors[m + ".weight"], tensors.pop(scale))
            dequantised.append(m)
    return dequantised


def write_assembly(tmp: Path, base: Path, base_config: dict, base_index: dict, spec: MTPSpec, master: Path,
                   master_config: dict, packed: dict[str, torch.Tensor], cfg: AssembleConfig,
                   durable: bool = True) -> dict:
    """Write everything into ``tmp`` (an empty directory). Returns facts for the manifest."""
    base_files = sorted(set(base_index["weight_map"].values()))
    headers = {f: read_header(base / f) for f in base_files}
    base_names = [n for h in headers.values() for n in h]
    base_sizes = {n: h[n]["data_offsets"][1] - h[n]["data_offsets"][0] for h in headers.values() for n in h}
    for n, f in base_index["weight_map"].items():
        if n not in headers[f]:
            raise ValueError(f"{base / INDEX} maps {n} to {f}, which does not hold it")
    if cfg.shard_name in base_files:
        raise ValueError(f"base checkpoint already has a shard named {cfg.shard_name}")
    base_fp8 = {n[: -len(".weight")] for h in headers.values() for n, v in h.items()
                if n.endswith(".weight") and v["dtype"] == "F8_E4M3"}
    scale_to = resolve_fp8_scale(cfg, base_names, base_fp8)
    passthrough, fp8_modules = passthrough_tensors(master, spec, scale_to)
    base_qc = base_config.get("quantization_config")
    served = [m for m in fp8_modules if loads_fp8_block(base_qc, spec, master_config, m)]
    dequantised = settle_fp8(passthrough, fp8_modules, set(served))
    shard = {**passthrough, **packed}
    expected = {spec.expert_name(e, p) + s for e in range(spec.n_experts) for p in ("w1", "w2", "w3")
                for s in PACKED_SUFFIXES}
    if set(packed) != expected:
        missing = sorted(expected - set(packed))
        raise RuntimeError(f"packed experts incomplete: {len(missing)} tensors missing (first {missing[:2]})")
    base_modules = sorted({n.rsplit(".", 1)[0] for n in base_names})
    # the config first: a base it cannot take is refused before anything is written
    qc, notes = merge_quant_config(base_qc, spec, master_config, mtp_linear_modules(spec, list(shard)), served,
                                   base_modules, cfg)
    if dequantised:
        notes.append(f"{len(dequantised)} FP8 MTP modules dequantised to BF16 (no base FP8 block group serves them)")
    write_safetensors(tmp / cfg.shard_name, shard, durable=durable)
    # every base shard, "dropped" ones too: the manifest says where each went
    links = {f: place_base_shard(base / f, tmp / f, headers[f], spec.prefix, durable) for f in base_files}
    index, dropped = union_index(base_index, base_sizes, spec.prefix, cfg.shard_name, shard)
    (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    config = dict(base_config)
    config["quantization_config"] = qc
    n_mtp = int(master_config.get("num_nextn_predict_layers", 1) or 1)
    if int(config.get("num_nextn_predict_layers", 0) or 0) < n_mtp:
        notes.append(f"num_nextn_predict_layers set to {n_mtp} (base had {config.get('num_nextn_predict_layers')})")
        config["num_nextn_predict_layers"] = n_mtp
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    side = copy_side_files(base, tmp, {"config.json", INDEX})
    if dropped:
        notes.append(f"{len(dropped)} MTP tensors of the base superseded: " + ", ".join(
            f"{f} {how}" for f, how in links.items() if how in ("filtered", "dropped")))
    return {"shard": cfg.shard_name, "shard_tensors": len(shard), "packed_tensors": len(packed),
            "passthrough_tensors": len(passthrough), "fp8_modules": served, "fp8_dequantised": dequantised,
            "fp8_scale_suffix": scale_to,
            "base_shards": links, "base_mtp_entries_dropped": len(dropped), "side_files": side,
            "index_entries": len(index["weight_map"]), "notes": notes, "shard_bytes": (tmp / cfg.shard_name).stat().st_size}

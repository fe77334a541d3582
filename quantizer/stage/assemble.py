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
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from requant.quantizer.mtp.arch import MTPSpec, check_config
from requant.quantizer.core.pack import w4a16_config_group
from requant.quantizer.core.quant import QuantSpec
from requant.storage.schema import DamagedInputError

from requant.quantizer.mtp.weights import (SCALE_SUFFIXES, dequant_fp8_block, e8m0_to_float, open_tensors, read_header,
                      read_json, tensor_files)

INDEX = "model.safetensors.index.json"
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


# -- base checkpoint ---------------------------------------------------------------------

def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (names → dtype, shape, data_offsets), checked
    against the file (a cut or damaged shard is an error naming it, never linked in)."""
    return read_header(path)


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
    index = read_json(index_file, "checkpoint index")
    wm = index.get("weight_map")
    if not isinstance(wm, dict) or not wm or not all(isinstance(f, str) for f in wm.values()):
        raise ValueError(f"{index_file}: no weight_map")
    missing = sorted({f for f in wm.values() if not (base / f).is_file()})
    if missing:
        raise FileNotFoundError(f"{index_file} names shards that are not there: {', '.join(missing[:3])}")
    # Index and shards must agree both ways: the shards are linked into the output as they are,
    # and vLLM loads every tensor of every listed file.
    heads = {f: safetensors_header(base / f) for f in sorted(set(wm.values()))}
    wrong = sorted(n for n, f in wm.items() if n not in heads[f])
    if wrong:
        raise DamagedInputError(f"{index_file} maps {wrong[0]} to {wm[wrong[0]]}, which does not hold it "
                                f"({len(wrong)} such entries): the index or the shard is damaged or from "
                                "another checkpoint")
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


# -- the MTP shard -----------------------------------------------------------------------

def expert_modules(spec: MTPSpec) -> set[str]:
    return {spec.expert_name(e, p) for e in range(spec.n_experts) for p in ("w1", "w2", "w3")}


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


# -- quantization_config -----------------------------------------------------------------
#
# vLLM matches a checkpoint's quantization_config against the prefixes its modules are built
# with, after mapping layer-path entries through the target's weight-name mapper (DSV4's
# drops every entry containing "mtp."). DSV4's MTP (vllm/models/deepseek_v4/*/mtp.py) builds
# its layer as model.layers.{num_hidden_layers}.* — e_proj, h_proj, attn.* and ffn.* directly
# under it, the shared expert's w2 as down_proj, the shared head as .head — and fuses
# wq_a + wkv (fused_wqa_wkv) and the shared expert's w1 + w3 (gate_up_proj). DSV3's MTP keeps
# the checkpoint prefixes, its shared head again as .head. Entries are therefore written under
# both the checkpoint names (what compressed-tensors itself matches) and vLLM's.

_FUSED = {"dsv4": (("attn.wq_a", "attn.wkv"), ("ffn.shared_experts.w1", "ffn.shared_experts.w3")),
          "dsv3": (("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
                   ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"))}


def _matches(target: str, name: str) -> bool:
    """compressed-tensors / vLLM target matching: ``re:`` regex (re.match) or the exact module
    name; a class target (no dot, e.g. ``Linear``) is taken to match every linear module."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or ("." not in target and target.endswith("Linear"))


def _mtp_layer(spec: MTPSpec, master_config: dict) -> str:
    return (f"model.layers.{master_config['num_hidden_layers']}." if spec.arch == "dsv4" else spec.prefix)


def vllm_names(spec: MTPSpec, master_config: dict, module: str) -> list[str]:
    """The names under which vLLM matches MTP checkpoint module ``module`` (itself included)."""
    rest = module.removeprefix(spec.prefix)
    if rest == "shared_head.head":
        rest = "head"
    if spec.arch == "dsv4":
        rest = rest.replace("ffn.shared_experts.w2", "ffn.shared_experts.down_proj")
    out = [module, _mtp_layer(spec, master_config) + rest]
    return list(dict.fromkeys(out))


def expert_targets(spec: MTPSpec, master_config: dict) -> list[str]:
    """Regex targets for the routed MTP experts: the checkpoint names, and for DSV4 also the
    module names vLLM gives them (``mtp.0.`` → ``model.layers.{num_hidden_layers}.…``)."""
    w1, w2, w3 = (spec.expert_name(0, p) for p in ("w1", "w2", "w3"))
    head = w1.rsplit(".", 2)[0]                       # "<prefix>ffn.experts" / "<prefix>mlp.experts"
    projs = "|".join(re.escape(n.rsplit(".", 1)[1]) for n in (w1, w2, w3))
    out = [f"re:^{re.escape(head)}\\.\\d+\\.({projs})$"]
    if spec.arch == "dsv4":
        layer = master_config.get("num_hidden_layers")
        out.append(f"re:^model\\.layers\\.{layer}\\..*experts\\.\\d+\\.({projs})$")
    return out


def _scheme_of(qc: dict, names: list[str]) -> str | None:
    """vLLM's view of one module: None if an ignore entry matches any of its names, else the
    first config group (in order) with a matching target; "" when none does."""
    if any(_matches(e, n) for e in qc.get("ignore") or [] for n in names):
        return None
    for gname, g in (qc.get("config_groups") or {}).items():
        if any(_matches(t, n) for t in g.get("targets", []) for n in names):
            return gname
    return ""


# MTP modules vLLM builds as a plain torch.nn.Linear, which no quantization config reaches:
# DSV3's eh_proj (vllm/model_executor/models/deepseek_mtp.py).
_PLAIN = {"dsv4": (), "dsv3": ("eh_proj",)}


def loads_fp8_block(qc: dict | None, spec: MTPSpec, master_config: dict, module: str) -> bool:
    """Whether vLLM loads MTP module ``module`` as FP8 in the master's layout: it builds it as
    a quantisable layer, and the group it matches (after ignores, under vLLM's names) quantises
    weights to static symmetric 8-bit float with 128×128 block scales."""
    if module.removeprefix(spec.prefix) in _PLAIN[spec.arch]:
        return False
    group = _scheme_of(qc or {}, vllm_names(spec, master_config, module))
    if not group:
        return False
    w = qc["config_groups"][group].get("weights") or {}
    return (w.get("type") == "float" and w.get("num_bits") == 8 and w.get("strategy") == "block"
            and list(w.get("block_structure") or []) == [128, 128] and not w.get("dynamic")
            and w.get("symmetric", True))


def check_mtp_view(qc: dict, spec: MTPSpec, master_config: dict, mtp_linears: list[str], fp8_modules: list[str],
                   group_name: str) -> None:
    """What vLLM will make of the merged config, before anything is written: the routed experts
    in ``group_name``, every MTP linear written in BF16 unquantised, every one written in FP8
    (``fp8_modules``) FP8 block-quantised, and both halves of each module vLLM fuses under the
    same scheme. Raises naming the module."""
    for e, proj in ((0, "w1"), (spec.n_experts - 1, "w2")):
        m = spec.expert_name(e, proj)
        got = _scheme_of(qc, vllm_names(spec, master_config, m))
        if got != group_name:
            raise ValueError(f"MTP routed expert {m}: vLLM would give it "
                             f"{'no scheme (ignored)' if got is None else repr(got) if got else 'no scheme'}, "
                             f"not the MTP group {group_name!r}")
    views = {}
    for m in mtp_linears:
        views[m] = _scheme_of(qc, vllm_names(spec, master_config, m))
        if m not in fp8_modules and views[m]:
            raise ValueError(f"base quantization_config group {views[m]!r} would quantise the MTP module {m} "
                             f"(vLLM: {vllm_names(spec, master_config, m)[-1]}), which the shard holds unquantised")
        if m in fp8_modules and not loads_fp8_block(qc, spec, master_config, m):
            raise ValueError(f"the MTP module {m} is written FP8 with 128x128 block scales, but the merged "
                             f"quantization_config gives it {views[m] or 'no scheme'!r}, not an FP8 block group")
    for a, b in _FUSED[spec.arch]:
        a, b = spec.prefix + a, spec.prefix + b
        if a in views and b in views and views[a] != views[b]:
            raise ValueError(f"vLLM fuses the MTP modules {a} and {b} into one layer, but the merged "
                             f"quantization_config gives them different schemes ({views[a]!r} vs {views[b]!r}): "
                             "the base's groups must serve both or neither")


def merge_quant_config(base_qc: dict | None, spec: MTPSpec, master_config: dict, mtp_linears: list[str],
                       fp8_modules: list[str], base_modules: list[str], cfg: AssembleConfig) -> tuple[dict, list[str]]:
    """Base ``quantization_config`` (or none) + the MTP experts' W4A16 group + MTP ignores for
    every linear of ``mtp_linears`` but ``fp8_modules`` (those the shard holds FP8, for a base
    FP8 block group). Returns (config, notes). Refuses a base whose config cannot take the MTP
    layer."""
    notes: list[str] = []
    qc = copy.deepcopy(base_qc) if base_qc else {}
    if qc and qc.get("quant_method") not in (None, "compressed-tensors"):
        raise ValueError(f"base quantization_config has quant_method {qc.get('quant_method')!r}: the MTP shard is "
                         "compressed-tensors pack-quantized and can only merge into a compressed-tensors config")
    experts = sorted(expert_modules(spec))
    expert_names = [n for m in experts for n in vllm_names(spec, master_config, m)]
    targets = expert_targets(spec, master_config)
    # base ignores that would switch our experts off: drop them if they only cover the MTP
    ignore = list(qc.get("ignore") or [])
    kept = []
    for entry in ignore:
        if not any(_matches(entry, n) for n in expert_names):
            kept.append(entry)
            continue
        if any(_matches(entry, m) for m in base_modules if not m.startswith(spec.prefix)):
            raise ValueError(f"base quantization_config ignore entry {entry!r} matches the MTP routed experts and "
                             "base modules too; cannot add the MTP experts without changing the base's meaning")
        notes.append(f"dropped base ignore entry {entry!r} (it covered the MTP routed experts)")
    group = w4a16_config_group(targets, cfg.spec, cfg.actorder)
    groups = dict(qc.get("config_groups") or {})
    name = cfg.group_name
    while name in groups:
        name += "_"
    for gname, g in groups.items():
        if any(_matches(t, n) for t in g.get("targets", []) for n in expert_names[:2]):
            notes.append(f"base group {gname!r} also targets the MTP experts; {name!r} is listed first so it applies")
    qc["config_groups"] = {name: group, **groups}
    # The MTP's other linears stay unquantised (under every name vLLM matches them by) unless
    # written FP8 for a base FP8 block group (settle_fp8); the shared head always.
    new_ignore = []
    for m in mtp_linears + [spec.prefix + "shared_head.head"]:
        if m not in fp8_modules:
            new_ignore += vllm_names(spec, master_config, m)
    qc["ignore"] = kept + [m for m in dict.fromkeys(new_ignore) if m not in kept]
    qc.setdefault("quant_method", "compressed-tensors")
    qc.setdefault("format", "pack-quantized" if not groups else "mixed-precision")
    qc.setdefault("quantization_status", "compressed")
    if groups and qc.get("format") not in ("mixed-precision", "pack-quantized"):
        notes.append(f"base format {qc['format']!r} kept; the MTP group carries format 'pack-quantized' itself")
    check_mtp_view(qc, spec, master_config, mtp_linears, fp8_modules, name)
    return qc, notes


def mtp_linear_modules(spec: MTPSpec, shard_names: list[str]) -> list[str]:
    """The MTP's non-expert linear modules present in the shard."""
    have = set(shard_names)
    return [m for m in spec.non_expert_prefixes() if m + ".weight" in have]


# -- writing -----------------------------------------------------------------------------

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


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


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


def write_assembly(tmp: Path, base: Path, base_config: dict, base_index: dict, spec: MTPSpec, master: Path,
                   master_config: dict, packed: dict[str, torch.Tensor], cfg: AssembleConfig,
                   durable: bool = True) -> dict:
    """Write everything into ``tmp`` (an empty directory). Returns facts for the manifest."""
    base_files = sorted(set(base_index["weight_map"].values()))
    headers = {f: safetensors_header(base / f) for f in base_files}
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
    links = {f: place_base_shard(base / f, tmp / f, headers[f], spec.prefix, durable) for f in base_files}
    links = {f: how for f, how in links.items() if how != "dropped"}
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

"""The output's ``quantization_config``: the base's, merged with a W4A16 group for the MTP's
routed experts and ignores for its other linears, and checked against what vLLM will make of
it (``check_mtp_view``) before anything is written.

vLLM matches a checkpoint's quantization_config against the prefixes its modules are built
with, after mapping layer-path entries through the target's weight-name mapper (DSV4's
drops every entry containing "mtp."). DSV4's MTP (vllm/models/deepseek_v4/*/mtp.py) builds
its layer as model.layers.{num_hidden_layers}.* — e_proj, h_proj, attn.* and ffn.* directly
under it, the shared expert's w2 as down_proj, the shared head as .head — and fuses
wq_a + wkv (fused_wqa_wkv) and the shared expert's w1 + w3 (gate_up_proj). DSV3's MTP keeps
the checkpoint prefixes, its shared head again as .head. Entries are therefore written under
both the checkpoint names (what compressed-tensors itself matches) and vLLM's.
"""
from __future__ import annotations

import copy
import re
from typing import Protocol

from requant.quantizer.core.pack import w4a16_config_group
from requant.quantizer.core.quant import QuantSpec
from requant.quantizer.mtp.arch import MTPSpec


class GroupSettings(Protocol):
    """What the W4A16 config group takes from the assembly's settings (``assemble.AssembleConfig``)."""
    spec: QuantSpec
    actorder: str | None
    group_name: str


def expert_modules(spec: MTPSpec) -> set[str]:
    return {spec.expert_name(e, p) for e in range(spec.n_experts) for p in ("w1", "w2", "w3")}


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
                       fp8_modules: list[str], base_modules: list[str], cfg: GroupSettings) -> tuple[dict, list[str]]:
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

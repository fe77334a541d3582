"""MTP architectures: what the quantize stage needs to know about a checkpoint's MTP layer
(``MTPSpec``, from its config.json: ``checkpoint_config`` → ``load_spec``) and the block that
replays it (``load_block``).

DeepSeek-V4: upstream naming ``mtp.0.*`` (experts ``mtp.0.ffn.experts.{e}.w1|w2|w3``), mHC with
``hc_mult`` residual streams, embedding shared with the target (``embed.weight``);
block in ``dsv4.DSV4Block``.
DeepSeek-V3: the MTP layer is decoder layer ``model.layers.{num_hidden_layers}.*`` (experts
``…mlp.experts.{e}.gate_proj|down_proj|up_proj``), ``hc_mult`` 1, its own ``embed_tokens``;
block in ``dsv3.DSV3Block``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from requant.storage.schema import DamagedInputError

from requant.quantizer.mtp.common import MTPBlock
from requant.quantizer.mtp.dsv3 import DSV3Block
from requant.quantizer.mtp.dsv4 import DSV4Block
from requant.quantizer.mtp.weights import check_not_dspark, load_mtp_weights, open_tensors, read_json, tensor_files

_DSV3_PROJ = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


@dataclass(frozen=True)
class MTPSpec:
    arch: str                       # "dsv3" | "dsv4"
    prefix: str                     # "model.layers.{n}." (DSV3) | "mtp.0." (DSV4)
    hidden: int
    hc_mult: int                    # 1 for DSV3
    n_experts: int
    topk: int
    moe_inter: int
    swiglu_limit: float | None      # DSV4 clamp; None for DSV3

    def expert_name(self, e: int, proj: str) -> str:
        """Checkpoint module name (no ``.weight``) of routed expert ``e``'s ``proj`` (w1/w2/w3)."""
        if proj not in ("w1", "w2", "w3"):
            raise ValueError(f"expert projection must be w1, w2 or w3, got {proj!r}")
        if not 0 <= e < self.n_experts:
            raise ValueError(f"expert {e} outside [0, {self.n_experts})")
        if self.arch == "dsv4":
            return f"{self.prefix}ffn.experts.{e}.{proj}"
        return f"{self.prefix}mlp.experts.{e}.{_DSV3_PROJ[proj]}"

    def non_expert_prefixes(self) -> list[str]:
        """Module names of the MTP layer's linears that stay unquantised (compressed-tensors
        ``ignore``): projections, attention, gate, shared expert, head — everything but the
        routed experts."""
        p = self.prefix
        if self.arch == "dsv4":
            names = ["e_proj", "h_proj", "attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_a", "attn.wo_b",
                     "ffn.gate", "ffn.shared_experts.w1", "ffn.shared_experts.w2", "ffn.shared_experts.w3"]
        else:
            names = ["eh_proj", "self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.q_proj",
                     "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj", "self_attn.o_proj", "mlp.gate",
                     "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj",
                     "shared_head.head"]
        return [p + n for n in names]


_BLOCKS: dict[str, type[MTPBlock]] = {"dsv3": DSV3Block, "dsv4": DSV4Block}
# where a checkpoint holds the target's token embedding (DSV4 upstream, HF naming)
TARGET_EMBEDDINGS = ("embed.weight", "model.embed_tokens.weight", "embed_tokens.weight")


def _arch(config: dict) -> str:
    mt = config.get("model_type", "")
    archs = " ".join(config.get("architectures") or [])
    if mt == "deepseek_v4" or "DeepseekV4" in archs or "hc_mult" in config:
        return "dsv4"
    if mt == "deepseek_v3" or "DeepseekV3" in archs:
        return "dsv3"
    raise ValueError(f"unsupported architecture (model_type {mt!r}, architectures {archs!r}): "
                     "requant handles DeepSeek-V3 and DeepSeek-V4 MTP layers")


# Types of the config.json values the quantize stage reads (a key may be absent; when present
# it must have its type — a damaged or hand-edited config fails here, naming the key).
_INT_KEYS = ("hidden_size", "hc_mult", "num_hidden_layers", "n_routed_experts", "num_experts_per_tok",
             "moe_intermediate_size", "num_nextn_predict_layers", "num_attention_heads", "head_dim",
             "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "kv_lora_rank", "o_groups", "o_lora_rank",
             "sliding_window", "hc_sinkhorn_iters", "n_group", "topk_group", "n_shared_experts", "vocab_size",
             "first_k_dense_replace", "intermediate_size", "index_topk")
_NULLABLE_INT_KEYS = ("q_lora_rank", "sliding_window", "index_topk", "n_group", "topk_group")
_FLOAT_KEYS = ("rope_theta", "rms_norm_eps", "hc_eps", "routed_scaling_factor", "swiglu_limit")
_STR_KEYS = ("model_type", "scoring_func", "topk_method")
_DICT_KEYS = ("quantization_config", "rope_scaling", "rope_parameters")


def check_config(config, where: str = "config.json") -> dict:
    """``config`` if every value the stage reads has its type; else a ``DamagedInputError``."""
    if not isinstance(config, dict):
        raise DamagedInputError(f"{where}: holds a {type(config).__name__}, not an object")

    def bad(key: str, want: str):
        return DamagedInputError(f"{where}: {key} = {config[key]!r:.80} is not {want}")

    for k in _INT_KEYS:
        v = config.get(k)
        if k in config and not (type(v) is int and v >= 0 or v is None and k in _NULLABLE_INT_KEYS):
            raise bad(k, "a non-negative integer")
    for k in _FLOAT_KEYS:
        v = config.get(k)
        if k in config and v is not None and not (type(v) in (int, float) and v == v):
            raise bad(k, "a number")
    for k in _STR_KEYS:
        if k in config and not isinstance(config[k], str):
            raise bad(k, "a string")
    for k in _DICT_KEYS:
        if k in config and config[k] is not None and not isinstance(config[k], dict):
            raise bad(k, "an object")
    if "architectures" in config and not (isinstance(config["architectures"], list)
                                          and all(isinstance(a, str) for a in config["architectures"])):
        raise bad("architectures", "a list of names")
    return config


def load_spec(config: dict) -> MTPSpec:
    """The MTP layer's spec from a checkpoint's config.json contents."""
    check_config(config)
    arch = _arch(config)
    check_not_dspark(config, "config.json")
    if int(config.get("num_nextn_predict_layers", 0) or 0) < 1:
        raise ValueError(f"{arch} config has num_nextn_predict_layers = "
                         f"{config.get('num_nextn_predict_layers', 0)}: no MTP layer to quantise")
    try:
        if arch == "dsv4":
            return MTPSpec("dsv4", "mtp.0.", config["hidden_size"], int(config["hc_mult"]),
                           config["n_routed_experts"], config["num_experts_per_tok"], config["moe_intermediate_size"],
                           config.get("swiglu_limit"))
        return MTPSpec("dsv3", f"model.layers.{config['num_hidden_layers']}.", config["hidden_size"], 1,
                       config["n_routed_experts"], config["num_experts_per_tok"], config["moe_intermediate_size"], None)
    except KeyError as e:
        raise ValueError(f"{arch} config lacks {e.args[0]!r}") from None


def config_file(checkpoint: str | Path) -> Path:
    """The config.json of a checkpoint (a directory, or a shard with the config beside it)."""
    checkpoint = Path(checkpoint)
    f = (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "config.json"
    if not f.exists():
        raise FileNotFoundError(f"{f}: no config.json for checkpoint {checkpoint} (needed to identify its MTP layer)")
    return f


def checkpoint_config(checkpoint: str | Path) -> dict:
    """A checkpoint's config.json contents, every value the stage reads checked (``check_config``)."""
    f = config_file(checkpoint)
    return check_config(read_json(f, "checkpoint config"), str(f))


def read_tensor(path: str | Path, names: list[str]) -> tuple[str, torch.Tensor] | None:
    """The first of ``names`` present in checkpoint ``path`` (directory or shard), or None."""
    where = tensor_files(Path(path))
    for n in names:
        if n in where:
            with open_tensors(where[n]) as f:
                return n, f.get_tensor(n)
    return None


def load_embedding(spec: MTPSpec, weights: dict, master: Path, embed_from: str | Path | None) -> torch.Tensor:
    """The embedding the MTP looks next tokens up in: DSV3's own ``embed_tokens`` (in ``weights``)
    or, for DSV4, the target's ``embed.weight`` from ``embed_from`` or else the master."""
    if spec.arch == "dsv3" and "embed_tokens.weight" in weights and embed_from is None:
        return weights["embed_tokens.weight"]
    names = list(TARGET_EMBEDDINGS)
    if spec.arch == "dsv3":
        names = [spec.prefix + "embed_tokens.weight"] + names
    src = Path(embed_from) if embed_from is not None else master
    found = read_tensor(src, names)
    if found is None:
        raise ValueError(f"{src}: no embedding ({', '.join(names)}); the {spec.arch.upper()} MTP needs the "
                         "target's token embedding — pass embed_from= a checkpoint that has it")
    return found[1].to(torch.bfloat16)


def load_block(master: str | Path, device=None, embed_from: str | Path | None = None, dtype=torch.bfloat16,
               weights: dict[str, torch.Tensor] | None = None) -> MTPBlock:
    """The MTP block of checkpoint ``master`` (directory or shard with a config.json beside it),
    master weights dequantised to bf16, on ``device`` (None: cuda if available, else cpu).
    ``weights``: the MTP tensors already loaded (names relative to the prefix) instead."""
    master = Path(master)
    config = checkpoint_config(master)
    spec = load_spec(config)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if weights is None:  # dequantised where the block runs: the stored (smaller) bytes cross to the device
        weights = load_mtp_weights(master, prefix=spec.prefix, device=device)
    embed = load_embedding(spec, weights, master, embed_from)
    if embed.shape[1] != spec.hidden:
        raise ValueError(f"embedding width {embed.shape[1]} != hidden_size {spec.hidden}")
    return _BLOCKS[spec.arch].from_config(spec, config, weights, embed, device=device, dtype=dtype)

"""Run by test_vllm_mtp_match.py in its own process: for each assembled checkpoint given, vLLM
builds its target and MTP trees on the meta device (requant.testing.vllm_meta; DeepSeek-V4: the
NVIDIA tree, DeepSeek-V3: its one tree)
with the CompressedTensorsConfig it reads from the checkpoint's config.json — the target
first, as the engine does, since the target's weight-name mapper rewrites the shared config.
Every module the MTP creates is listed with the quantisation vLLM gave it (the method it
chose, and vLLM's get_scheme_dict for that prefix), and every tensor of the checkpoint's MTP
shard is fed to vLLM's MTP load_weights (with one anchor tensor of the layer), recording the
parameters it lands on and their dtypes (the shard tensor's, then each parameter's). argv: PORT CKPT...
Prints RESULT {json}."""
import json
import os
import sys
from pathlib import Path


def _args(q):
    if q is None:
        return None
    return {"num_bits": q.num_bits, "type": getattr(q.type, "value", q.type), "strategy": getattr(q.strategy, "value", q.strategy),
            "group_size": q.group_size, "block": q.block_structure, "symmetric": q.symmetric}


def match(ckpt: Path) -> dict:
    from safetensors import safe_open
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    from requant.testing.vllm_meta import build, engine_config, tree_class

    vc = engine_config(str(ckpt))
    qc = vc.quant_config
    if vc.model_config.hf_config.model_type == "deepseek_v4":
        target_cls, mtp_cls = tree_class("nvidia", "target"), tree_class("nvidia", "mtp")
    else:  # DeepSeek-V3: one tree for every platform
        from vllm.model_executor.models.deepseek_mtp import DeepSeekMTP
        from vllm.model_executor.models.deepseek_v2 import DeepseekV3ForCausalLM as target_cls
        mtp_cls = DeepSeekMTP
    build(vc, target_cls)
    mtp = build(vc, mtp_cls, vc.speculative_config.draft_model_config)
    modules = {}
    for name, mod in mtp.named_modules():
        method = getattr(mod, "quant_method", None)
        prefix = getattr(mod, "layer_name", None) if isinstance(mod, RoutedExperts) else getattr(mod, "prefix", None)
        if method is None or prefix is None:
            continue
        # vLLM's matcher on vLLM's prefix (a fused MoE is matched by its first expert's w1)
        probe = f"{prefix}.0.{mod.ckpt_gate_proj_name}" if isinstance(mod, RoutedExperts) else prefix
        sd = qc.get_scheme_dict(mod, probe)
        modules[name] = {"prefix": prefix, "class": type(mod).__name__, "method": type(method).__name__,
                         "scheme": type(getattr(mod, "scheme", None)).__name__ if hasattr(mod, "scheme") else None,
                         "weights": _args(sd.get("weights")) if sd else None}
    shard = next(p for p in ckpt.glob("model-mtp-*.safetensors"))
    params = {n: p.dtype for n, p in mtp.named_parameters()}
    placed, dtypes = {}, {}
    with safe_open(str(shard), "pt") as f:
        # each tensor with an anchor in the MTP layer (enorm): vLLM's loader refuses a call that
        # loads nothing of the layer (DSV3's MTP embedding lands on the shared model.embed_tokens)
        anchor = next(n for n in f.keys() if n.endswith("enorm.weight"))
        anchor_params = mtp.load_weights(iter([(anchor, f.get_tensor(anchor))]))
        for name in f.keys():
            try:
                got = mtp.load_weights(iter([(anchor, f.get_tensor(anchor)), (name, f.get_tensor(name))]))
                placed[name] = sorted(got - anchor_params) if name != anchor else sorted(anchor_params)
                dtypes[name] = [str(f.get_slice(name).get_dtype())] + [str(params[p]) for p in placed[name]]
            except (KeyError, ValueError, AssertionError, RuntimeError) as e:
                placed[name] = f"{type(e).__name__}: {e}"
    loaded = {p for v in placed.values() if isinstance(v, list) for p in v}
    return {"modules": modules, "placed": placed, "dtypes": dtypes, "unloaded": sorted(set(params) - loaded),
            "ignore": qc.ignore}


def main() -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from requant.testing.vllm_meta import engine_config, init_distributed

    port, ckpts = int(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
    init_distributed(engine_config(str(ckpts[0])), port)
    print("RESULT " + json.dumps({p.name: match(p) for p in ckpts}), flush=True)


if __name__ == "__main__":
    main()

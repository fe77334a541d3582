"""Run by test_vllm_mtp_match.py in its own process: for each assembled DeepSeek-V4 checkpoint
given, vLLM builds its NVIDIA target and MTP trees on the meta device (tests/_vllm_meta.py)
with the CompressedTensorsConfig it reads from the checkpoint's config.json — the target
first, as the engine does, since the target's weight-name mapper rewrites the shared config.
Every module the MTP creates is listed with the quantisation vLLM gave it (the method it
chose, and vLLM's get_scheme_dict for that prefix), and every tensor of the checkpoint's MTP
shard is fed to vLLM's DeepSeekV4MTP.load_weights on its own, recording the parameters it
lands on. argv: PORT CKPT... Prints RESULT {json}."""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for tests._vllm_meta


def _args(q):
    if q is None:
        return None
    return {"num_bits": q.num_bits, "type": getattr(q.type, "value", q.type), "strategy": getattr(q.strategy, "value", q.strategy),
            "group_size": q.group_size, "block": q.block_structure, "symmetric": q.symmetric}


def match(ckpt: Path) -> dict:
    from safetensors import safe_open
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    from tests._vllm_meta import build, engine_config, tree_class

    vc = engine_config(str(ckpt))
    qc = vc.quant_config
    build(vc, tree_class("nvidia", "target"))
    mtp = build(vc, tree_class("nvidia", "mtp"), vc.speculative_config.draft_model_config)
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
    placed, params = {}, set(dict(mtp.named_parameters()))
    with safe_open(str(shard), "pt") as f:
        for name in f.keys():
            try:
                placed[name] = sorted(mtp.load_weights(iter([(name, f.get_tensor(name))])))
            except (KeyError, ValueError, AssertionError, RuntimeError) as e:
                placed[name] = f"{type(e).__name__}: {e}"
    loaded = {p for v in placed.values() if isinstance(v, list) for p in v}
    return {"modules": modules, "placed": placed, "unloaded": sorted(params - loaded), "ignore": qc.ignore}


def main() -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from tests._vllm_meta import engine_config, init_distributed

    port, ckpts = int(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
    init_distributed(engine_config(str(ckpts[0])), port)
    print("RESULT " + json.dumps({p.name: match(p) for p in ckpts}), flush=True)


if __name__ == "__main__":
    main()

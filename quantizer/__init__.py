"""requant.quantizer: GPTQ of a DeepSeek MTP layer's routed experts to W4A16 from captured inputs.

Three layers, each importing only the ones before it (``tests/quantizer/test_layout.py``):

* ``core`` — model-independent quantisation: INT group quantisation with compressed-tensors'
  scale rule (``quant``), ``pack-quantized`` tensors (``pack``), per-expert Hessians and their
  exact fixed-point sums (``hessian``), batched GPTQ (``gptq``), GPTQ of a set of experts with
  the low-token policy (``experts``), held-out errors (``heldout``), Triton kernels
  (``gptq_triton``, ``hessian_triton``), the worker memory model (``memory``, torch-free) and
  the replay's size defaults (``limits``, torch-free).
* ``mtp`` — the MTP architectures: config.json → ``MTPSpec`` and ``load_block`` (``arch``),
  master weights dequantised (``weights``), the DeepSeek-V3 and -V4 blocks (``dsv3``, ``dsv4``;
  shared pieces in ``common``), the MoE output for drafts (``moe``).
* ``stage`` — the quantize stage: replay of capture stores into Hessians (``replay``),
  partitions and the held-out split (``partition``), workers (``distribute``), the checkpoint
  (``assemble``), the report (``report``), the job (``job``) and ``run_quantize`` (``run``).

Above them: offline draft acceptance of a checkpoint (``evaluate``), ``requant quantize-demo``
(``demo``) and the CLI commands (``cli``).

The names below are the public API, imported on first use (``from requant.quantizer import
run_quantize`` loads the stage, ``requant.quantizer.core.limits`` alone loads no torch)::

    from requant.quantizer import HessianSet, ExpertQuantConfig, quantize_experts
    h_in, h_mid = HessianSet(256, 4096), HessianSet(256, 2048)
    h_in.add(x, topk_ids)
    tensors, records = quantize_experts(w1, w2, w3, h_in, h_mid, ExpertQuantConfig())

    from requant.quantizer import QuantizeJob, run_quantize
    run_quantize(QuantizeJob(stores=["runs/cap"], master="DeepSeek-V4-Flash", base="…-W4A16", out="runs/q"))
"""
from __future__ import annotations

import importlib

_API = {
    # core
    "QuantSpec": "core.quant", "rtn": "core.quant", "dequantize": "core.quant",
    "packed_tensors": "core.pack",
    "HessianSet": "core.hessian", "swiglu_intermediate": "core.hessian",
    "GPTQConfig": "core.gptq", "gptq_batched": "core.gptq",
    "ExpertQuantConfig": "core.experts", "LowTokenPolicy": "core.experts", "TensorRecord": "core.experts",
    "quantize_experts": "core.experts",
    "tensor_errors": "core.heldout",
    # mtp
    "MTPSpec": "mtp.arch", "checkpoint_config": "mtp.arch", "load_spec": "mtp.arch", "load_block": "mtp.arch",
    "load_mtp_weights": "mtp.weights",
    # stage
    "QuantizeJob": "stage.job", "QuantizeResult": "stage.run", "run_quantize": "stage.run",
    # offline evaluation
    "OfflineConfig": "evaluate", "evaluate_offline": "evaluate",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))

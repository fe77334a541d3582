"""requant.quantizer.core: model-independent quantisation (imports nothing of ``mtp`` or ``stage``).

* ``quant`` — ``QuantSpec``; symmetric INT group scales with compressed-tensors' rule, RTN,
  dequantisation.
* ``pack`` — compressed-tensors ``pack-quantized`` tensors (int32 nibbles, scales, shape) and the
  W4A16 ``config_groups`` entry.
* ``hessian`` — ``HessianSet`` (per-expert Σ xxᵀ and token counts), ``FixedPointSum`` (exact int64
  sums of partial sets, any grouping the same bits), ``PackedHessians`` (upper triangles),
  the pooled Hessian's integer sum, ``swiglu_intermediate`` (the w2 input).
* ``hessian_triton`` — the grouped rank-k update of every expert's Hessian in one CUDA launch.
* ``gptq`` — ``GPTQConfig``, batched GPTQ without an inverse (one Cholesky of the reversed
  Hessian), damp retries, RTN fallback, act-order; ``relative_output_error``.
* ``gptq_triton`` — the fused in-block column loop on CUDA.
* ``experts`` — ``quantize_experts``: GPTQ of a set of routed experts (w1+w3 on one Hessian, w2 on
  the intermediate's) with ``LowTokenPolicy`` and the zero-token rule → packed tensors and a
  ``TensorRecord`` per tensor; ``ExpertQuantConfig``.
* ``heldout`` — errors of written tensors and of RTN on held-out Hessians.
* ``memory`` — a worker's peak memory per step from the plan, and the check that refuses a plan
  before any work (torch-free).
* ``limits`` — the replay's size defaults (torch-free: the CLI shows them without torch).
"""

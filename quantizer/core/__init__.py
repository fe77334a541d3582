"""requant.quantizer.core: model-independent quantisation — INT4 group quantisation, compressed-tensors packing, per-expert Hessians, batched GPTQ (+ Triton kernels), held-out error, memory model."""

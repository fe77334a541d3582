"""Replay benchmark at DeepSeek-V4-Flash MTP shapes: ``identity`` vs ``full`` replay (the MTP
block up to the routed experts' inputs, then the per-expert w1/w3 and w2 Hessians of all 256
experts), random weights built on the device, synthetic rows in sequences of ``--seq-len``.

The rows come from host memory as the store reader hands them over (bf16 on the CPU), so the
host→device copy is part of the time; reading/decoding the store is not (storage_bench.py).
Prints rows/s per mode, the seconds for the seed's 473k rows, and the full/identity cost
ratio; writes JSON. ``--small`` is a CPU smoke test with reduced shapes.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _path import ensure_requant  # noqa: E402

ensure_requant()
from requant.quantizer.mtp.arch import MTPSpec  # noqa: E402
from requant.quantizer.mtp.dsv4 import DSV4Block, DSV4Dims  # noqa: E402
from requant.quantizer.stage.replay import HessianAccumulator  # noqa: E402

SEED_ROWS = 473_000


def dims(small: bool) -> DSV4Dims:
    if small:
        return DSV4Dims(hidden=512, hc_mult=4, n_heads=16, head_dim=512, rope_dim=64, q_lora_rank=256, o_groups=4,
                        o_lora_rank=256, window=128, rope_theta=10000.0, eps=1e-6, hc_eps=1e-6, hc_iters=20,
                        n_experts=16, topk=6, routed_scale=1.5, norm_topk=True, scoring="sqrtsoftplus",
                        swiglu_limit=10.0)
    return DSV4Dims(hidden=4096, hc_mult=4, n_heads=64, head_dim=512, rope_dim=64, q_lora_rank=1024, o_groups=8,
                    o_lora_rank=1024, window=128, rope_theta=10000.0, eps=1e-6, hc_eps=1e-6, hc_iters=20,
                    n_experts=256, topk=6, routed_scale=1.5, norm_topk=True, scoring="sqrtsoftplus",
                    swiglu_limit=10.0)


def random_block(d: DSV4Dims, inter: int, vocab: int, dev: torch.device) -> DSV4Block:
    g = torch.Generator(dev).manual_seed(0)

    def lin(o, i, *lead):
        return (torch.randn(*lead, o, i, generator=g, device=dev) * i ** -0.5).bfloat16()

    D, n, H, hd = d.hidden, d.hc_mult, d.n_heads, d.head_dim
    w = {"enorm.weight": torch.ones(D), "hnorm.weight": torch.ones(D), "e_proj.weight": lin(D, D),
         "h_proj.weight": lin(D, D), "attn_norm.weight": torch.ones(D), "ffn_norm.weight": torch.ones(D),
         "attn.wq_a.weight": lin(d.q_lora_rank, D), "attn.q_norm.weight": torch.ones(d.q_lora_rank),
         "attn.wq_b.weight": lin(H * hd, d.q_lora_rank), "attn.wkv.weight": lin(hd, D),
         "attn.kv_norm.weight": torch.ones(hd), "attn.wo_a.weight": lin(d.o_groups * d.o_lora_rank, H * hd // d.o_groups),
         "attn.wo_b.weight": lin(D, d.o_groups * d.o_lora_rank), "attn.attn_sink": torch.zeros(H),
         "ffn.gate.weight": lin(d.n_experts, D), "ffn.gate.bias": torch.zeros(d.n_experts),
         "ffn.experts.w1": lin(inter, D, d.n_experts), "ffn.experts.w3": lin(inter, D, d.n_experts),
         "ffn.experts.w2": lin(D, inter, d.n_experts)}
    for hc in ("attn", "ffn"):
        w[f"hc_{hc}_fn"] = torch.randn((2 + n) * n, n * D, generator=g, device=dev) * 0.02
        w[f"hc_{hc}_base"] = torch.zeros((2 + n) * n)
        w[f"hc_{hc}_scale"] = torch.ones(3)
    spec = MTPSpec("dsv4", "mtp.0.", D, n, d.n_experts, d.topk, inter, d.swiglu_limit)
    embed = (torch.randn(vocab, D) * 0.02).bfloat16()
    return DSV4Block(spec, d, w, embed, device=dev)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=65536, help="rows replayed per mode")
    ap.add_argument("--chunk", type=int, default=16384, help="rows per block call (a reader batch)")
    ap.add_argument("--seq-len", type=int, default=2048, help="sequence length (seed: ~1,850 rows per prompt)")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/replay_bench.json")
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = dims(a.small)
    inter = 256 if a.small else 2048
    if a.small:
        a.rows, a.chunk, a.seq_len = min(a.rows, 2048), min(a.chunk, 1024), min(a.seq_len, 256)
    t = time.perf_counter()
    block = random_block(d, inter, 4096 if a.small else 129280, dev)
    print(f"block built in {time.perf_counter() - t:.1f} s on {dev}")
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(a.chunk, d.hc_mult * d.hidden, generator=g).bfloat16()
    tok = torch.randint(0, block.embed.shape[0], (a.chunk,), generator=g)
    lens = [a.seq_len] * (a.chunk // a.seq_len) + ([a.chunk % a.seq_len] if a.chunk % a.seq_len else [])
    pos = torch.cat([torch.arange(n) for n in lens])
    result = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor(),
              "torch": torch.__version__, "rows": a.rows, "chunk": a.chunk, "seq_len": a.seq_len,
              "small": a.small, "modes": {}}
    for mode in ("identity", "full"):
        acc = HessianAccumulator(block, device=dev)
        with torch.no_grad():
            acc.add(*block.moe_inputs(hidden, tok, pos, mode, lens))      # warm-up (kernels, allocator)
            sync()
            t_block = t_hess = 0.0
            done = 0
            while done < a.rows:
                t0 = time.perf_counter()
                out = block.moe_inputs(hidden, tok, pos, mode, lens)
                sync()
                t1 = time.perf_counter()
                acc.add(*out)
                sync()
                t_block += t1 - t0
                t_hess += time.perf_counter() - t1
                done += a.chunk
        total = t_block + t_hess
        r = {"block_s": t_block, "hessian_s": t_hess, "rows_per_s": done / total,
             "seed_rows_s": SEED_ROWS * total / done}
        result["modes"][mode] = r
        print(f"{mode:8s}: block {t_block:6.2f} s + Hessians {t_hess:6.2f} s for {done} rows = "
              f"{done / total:9.0f} rows/s → {r['seed_rows_s']:6.1f} s for {SEED_ROWS} rows")
        del acc
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    m = result["modes"]
    result["full_over_identity"] = m["full"]["seed_rows_s"] / m["identity"]["seed_rows_s"]
    print(f"full / identity cost: {result['full_over_identity']:.2f}×")
    if dev.type == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(f"peak GPU memory {result['max_memory_gib']:.1f} GiB")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

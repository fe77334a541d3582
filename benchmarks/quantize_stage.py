"""The whole quantize stage at full calibration scale: capture store → assembled checkpoint directory.

Problem (DeepSeek-V4-Flash MTP shapes): a synthetic capture store of 473k rows (a full
calibration set; 256 sequences, 4 × 4096 bf16 residual streams per row), a FAKE master
checkpoint — random weights at the real MTP layer's shapes and formats, named so, since
the 284B model cannot be downloaded here: FP8 E4M3 block-128 linears with E8M0 ``.scale``
(attention, e/h_proj, shared expert), routed experts BF16 (``--mxfp4`` stores them MXFP4 as
upstream), 256 experts top-6, moe_inter 2048 — and a fake base checkpoint (embedding, head,
index, a compressed-tensors config) to assemble into.

Runs ``run_quantize`` (one process, this GPU) with identity replay twice (cold: first CUDA
and Triton use; warm) and full replay once, and prints each phase against the anchor timings
(~3 min Hessians + GPTQ, ~2 min splice into the checkpoint) and the identity vs
full replay cost ratio. ``--workers N`` adds the stage on N workers (one per GPU: spawned
processes, or ``--ray`` actors) in ``--parallel`` mode(s) — data-parallel replay with the
NCCL reduction, replicated replay, or both — with each phase's wall time, store bytes read
and Hessian bytes reduced per worker, and whether the shard equals the one-GPU one. Writes
JSON under benchmarks/results/.

    python3 benchmarks/quantize_stage.py --out benchmarks/results/quantize_stage_h100.json
    python3 benchmarks/quantize_stage.py --skip-full --workers 8 --parallel both   # 8 GPUs
    python3 benchmarks/quantize_stage.py --small          # CPU smoke test, seconds
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _path import ensure_requant  # noqa: E402

ensure_requant()
from requant.quantizer.stage.safetensors_io import write_safetensors  # noqa: E402
from requant.quantizer import QuantizeJob, run_quantize  # noqa: E402
from requant.storage import CaptureStore, StoreMeta  # noqa: E402

ANCHOR_S = {"hessians_gptq": 180.0, "splice": 120.0}  # "~3 min" + "~2 min"


def dsv4_config(small: bool) -> dict:
    """DeepSeek-V4-Flash's MTP-relevant config (upstream names); --small shrinks it."""
    c = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "torch_dtype": "bfloat16",
         "vocab_size": 129280, "hidden_size": 4096, "num_hidden_layers": 43, "num_nextn_predict_layers": 1,
         "num_hash_layers": 3, "num_attention_heads": 64, "num_key_value_heads": 1, "head_dim": 512,
         "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_lora_rank": 1024, "o_groups": 8, "sliding_window": 128,
         "rope_theta": 10000.0, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "n_routed_experts": 256,
         "num_experts_per_tok": 6, "n_shared_experts": 1, "moe_intermediate_size": 2048,
         "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc", "norm_topk_prob": True,
         "routed_scaling_factor": 1.5, "swiglu_limit": 10.0, "hidden_act": "silu", "rms_norm_eps": 1e-6,
         "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1}
    if small:
        c.update(vocab_size=4096, hidden_size=512, num_hidden_layers=2, num_attention_heads=8, q_lora_rank=256,
                 o_lora_rank=256, o_groups=4, n_routed_experts=16, num_experts_per_tok=2, moe_intermediate_size=256)
    c["compress_ratios"] = [0] * (c["num_hidden_layers"] + 1)
    return c


def _fp8_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 E4M3 weight + E8M0 scale per 128×128 block (power-of-two scales, as upstream)."""
    o, i = w.shape
    blocks = w.float().unflatten(0, (o // 128, 128)).unflatten(2, (i // 128, 128))
    amax = blocks.abs().amax((1, 3)).clamp(min=1e-12)
    exp = torch.ceil(torch.log2(amax / 448.0)).clamp(-127, 127)
    s = torch.exp2(exp)
    q = (blocks / s[:, None, :, None]).clamp(-448, 448).flatten(2).flatten(0, 1).to(torch.float8_e4m3fn)
    return q, (exp + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def _mxfp4(w: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random MXFP4 codes (two per int8, low nibble first) + E8M0 scales per 32 inputs."""
    o, i = w.shape
    codes = torch.randint(0, 16, (o, i // 2), generator=g, dtype=torch.uint8, device=w.device) | \
        (torch.randint(0, 16, (o, i // 2), generator=g, dtype=torch.uint8, device=w.device) << 4)
    scale = torch.full((o, i // 32), 127 - 6, dtype=torch.uint8, device=w.device)
    return codes.view(torch.int8), scale.view(torch.float8_e8m0fnu)


def write_result(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


def fake_master(out: Path, c: dict, dev: torch.device, mxfp4: bool, seed: int = 0) -> Path:
    """FAKE master: random weights at the real MTP layer's names, shapes and on-disk formats."""
    g = torch.Generator(device=dev).manual_seed(seed)
    D, hc, E, I = c["hidden_size"], c["hc_mult"], c["n_routed_experts"], c["moe_intermediate_size"]
    H, hd, ql, og, ol = c["num_attention_heads"], c["head_dim"], c["q_lora_rank"], c["o_groups"], c["o_lora_rank"]

    def lin(o, i):
        return torch.randn(o, i, generator=g, device=dev) / i ** 0.5

    t: dict[str, torch.Tensor] = {}

    def fp8(name, o, i):
        q, s = _fp8_block(lin(o, i))
        t[f"mtp.0.{name}.weight"], t[f"mtp.0.{name}.scale"] = q, s

    for n in ("enorm", "hnorm", "attn_norm", "ffn_norm", "norm"):
        t[f"mtp.0.{n}.weight"] = torch.ones(D, dtype=torch.bfloat16, device=dev)
    fp8("e_proj", D, D)
    fp8("h_proj", D, D)
    fp8("attn.wq_a", ql, D)
    fp8("attn.wq_b", H * hd, ql)
    fp8("attn.wkv", hd, D)
    fp8("attn.wo_a", og * ol, H * hd // og)
    fp8("attn.wo_b", D, og * ol)
    t["mtp.0.attn.q_norm.weight"] = torch.ones(ql, dtype=torch.bfloat16, device=dev)
    t["mtp.0.attn.kv_norm.weight"] = torch.ones(hd, dtype=torch.bfloat16, device=dev)
    t["mtp.0.attn.attn_sink"] = torch.randn(H, generator=g, device=dev)
    for hcn in ("attn", "ffn"):
        t[f"mtp.0.hc_{hcn}_fn"] = torch.randn((2 + hc) * hc, hc * D, generator=g, device=dev) * 0.01
        t[f"mtp.0.hc_{hcn}_base"] = torch.randn((2 + hc) * hc, generator=g, device=dev) * 0.1
        t[f"mtp.0.hc_{hcn}_scale"] = torch.ones(3, device=dev)
    t["mtp.0.hc_head_fn"] = torch.randn(hc, hc * D, generator=g, device=dev) * 0.01
    t["mtp.0.hc_head_base"] = torch.zeros(hc, device=dev)
    t["mtp.0.hc_head_scale"] = torch.ones(1, device=dev)
    t["mtp.0.ffn.gate.weight"] = lin(E, D).bfloat16()
    # a spread-out correction bias skews routing (430 … 175k tokens per expert, the range of a real DSV4-Flash capture)
    t["mtp.0.ffn.gate.bias"] = torch.randn(E, generator=g, device=dev) * 0.3
    fp8("ffn.shared_experts.w1", I, D)
    fp8("ffn.shared_experts.w3", I, D)
    fp8("ffn.shared_experts.w2", D, I)
    for e in range(E):
        for p, (o, i) in (("w1", (I, D)), ("w3", (I, D)), ("w2", (D, I))):
            if mxfp4:
                t[f"mtp.0.ffn.experts.{e}.{p}.weight"], t[f"mtp.0.ffn.experts.{e}.{p}.scale"] = _mxfp4(lin(o, i), g)
            else:
                t[f"mtp.0.ffn.experts.{e}.{p}.weight"] = lin(o, i).bfloat16()
    out.mkdir(parents=True)
    write_safetensors(out / "model-mtp.safetensors", t, durable=False)
    (out / "config.json").write_text(json.dumps(c, indent=1))
    return out


def fake_base(out: Path, c: dict, dev: torch.device, seed: int = 1) -> Path:
    """FAKE base: the target's embedding/head/norms in an indexed shard, a compressed-tensors config.
    Seeded like the master and the store: reruns (other processes) must give the same shard."""
    D, V, hc = c["hidden_size"], c["vocab_size"], c["hc_mult"]
    g = torch.Generator(device=dev).manual_seed(seed)
    t = {"embed.weight": (torch.randn(V, D, generator=g, device=dev) * 0.02).bfloat16(),
         "head.weight": (torch.randn(V, D, generator=g, device=dev) * 0.02).bfloat16(),
         "norm.weight": torch.ones(D, dtype=torch.bfloat16, device=dev),
         "hc_head_fn": torch.randn(hc, hc * D, generator=g, device=dev) * 0.01, "hc_head_base": torch.zeros(hc, device=dev),
         "hc_head_scale": torch.ones(1, device=dev)}
    out.mkdir(parents=True)
    write_safetensors(out / "model-00001-of-00001.safetensors", t, durable=False)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in t.values())},
         "weight_map": {k: "model-00001-of-00001.safetensors" for k in t}}))
    group = {"targets": ["re:^layers\\.\\d+\\.ffn\\.experts\\.\\d+\\.(w1|w2|w3)$"], "format": "pack-quantized",
             "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128,
                         "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {},
                         "block_structure": None}, "input_activations": None, "output_activations": None}
    cfg = dict(c, quantization_config={"quant_method": "compressed-tensors", "format": "pack-quantized",
                                       "quantization_status": "compressed", "config_groups": {"group_0": group},
                                       "ignore": ["head"]})
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    (out / "tokenizer_config.json").write_text("{}")
    return out


def synthetic_store(path: Path, c: dict, rows: int, seqs: int, dev: torch.device, seed: int = 0) -> int:
    """Rows of 4 × hidden bf16: heavy-ish tailed, correlated across channels (low-rank mix),
    per-channel scales — not uniform noise; random next tokens; whole sequences."""
    D, hc, V = c["hidden_size"], c["hc_mult"], c["vocab_size"]
    g = torch.Generator(device=dev).manual_seed(seed)
    mix = torch.randn(64, hc * D, generator=g, device=dev) / 8
    scale = torch.exp(torch.randn(hc * D, generator=g, device=dev) * 0.5)
    store = CaptureStore.create(str(path), StoreMeta(hidden_size=D, hc_mult=hc, model="FAKE DeepSeek-V4-Flash (synthetic)",
                                                     capture_point="target_pre_head"))
    lens = [rows // seqs + (1 if i < rows % seqs else 0) for i in range(seqs)]
    with store.writer("synthetic") as w:
        for s, n in enumerate(lens):
            lat = torch.randn(n, 64, generator=g, device=dev)
            x = ((lat @ mix + 0.3 * torch.randn(n, hc * D, generator=g, device=dev)) * scale).bfloat16()
            tok = torch.randint(2, V, (n,), generator=g, device=dev)
            w.append_sequence(s, x, tok.cpu().numpy(), torch.arange(n).numpy(), prompt_id=f"p{s}")
    return sum(lens)


def run(job_kw: dict, out: Path) -> dict:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    res = run_quantize(QuantizeJob(out=str(out), **job_kw), progress=False)
    wall = time.perf_counter() - t
    # this process's device peak: the whole stage when its one worker runs here (not for N workers)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda and job_kw["workers"] == 1 else None
    m = json.loads(res.manifest.read_text())
    sha = hashlib.sha256()
    with open(res.shard, "rb") as f:  # after the timing: is the shard reproducible?
        for chunk in iter(lambda: f.read(1 << 26), b""):
            sha.update(chunk)
    sl = m["workers"][0]["seconds"]
    dist = m.get("hessian_distance") or {}
    d_in = sorted(v[0] for v in dist.values() if v[0] == v[0] and v[0] != float("inf"))
    walls = m["timings"]
    return {"hessian_distance_h_in_median_max": [d_in[len(d_in) // 2], d_in[-1]] if d_in else None,
            "wall_s": wall, "peak_gpu_gib": peak, "timings": walls, "slice": sl, "summary": m["summary"],
            "replay_s": sum(v for k, v in walls.items() if k.startswith("replay ")),
            "reduce_s": sum(v for k, v in walls.items() if k.startswith("reduce ")),
            "bytes_read_per_worker": m["summary"]["bytes_read_per_worker"],
            "bytes_reduced_per_worker": [w["bytes_reduced"] for w in m["workers"]],
            "gptq_batch": m["gptq"]["batch"], "tokens_min_mean_max": [min(m["tokens_per_expert"]),
                                                                     sum(m["tokens_per_expert"]) / len(m["tokens_per_expert"]),
                                                                     max(m["tokens_per_expert"])],
            "shard_bytes": m["assembly"]["shard_bytes"], "paths": sorted({r["path"] for r in m["tensors"]}),
            "shard_sha256": sha.hexdigest()}


def evaluate(out: Path, store: Path) -> dict:
    """Offline draft acceptance of the quantised checkpoint against its master, both replay
    modes, on the store (in-sample here: the store calibrated it; random weights, so only the
    cost means anything)."""
    from requant.quantizer import evaluate as ev
    from requant.quantizer.evaluate import OfflineConfig, evaluate_offline

    # The synthetic store's tokens are random: no tail of a sequence is the fake target's greedy
    # choice, so evaluate would count no position. For the cost, every position counts (as when
    # the prompts file says where each sequence's generated part starts: at 0).
    ev.generated_start = lambda next_token, prompt, greedy: (0, "prompt")
    t = time.perf_counter()
    res = evaluate_offline(OfflineConfig(checkpoint=str(out), stores=(str(store),)))
    wall = time.perf_counter() - t
    modes = {m: {k: v for k, v in r.items() if k in ("positions", "acceptance", "ce", "kl_to_master")}
             for m, r in res["modes"].items()}
    print(f"evaluate --offline       wall {wall:6.2f} s  ({res['sequences']} sequences; {modes})", flush=True)
    return {"wall_s": wall, "sequences": res["sequences"], "modes": modes}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="reduced problem (CPU smoke test)")
    ap.add_argument("--rows", type=int, default=None, help="store rows (default 473,000; --small 4,096)")
    ap.add_argument("--mxfp4", action="store_true", help="fake master's routed experts in MXFP4 (as upstream)")
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--both", action="store_true", help="also run --replay both (full + identity, Hessian distance)")
    ap.add_argument("--full-twice", action="store_true", help="a second full-replay run: is its shard reproducible?")
    ap.add_argument("--workers", "--gpus", dest="gpus", type=int, default=1,
                    help="also run the identity stage on N workers (GPUs), one process each")
    ap.add_argument("--parallel", choices=["data", "replicated", "both"], default="data",
                    help="replay mode(s) of the N-worker run (both: one run each, same store)")
    ap.add_argument("--ray", action="store_true", help="the N-worker run on Ray actors instead of processes")
    ap.add_argument("--partitions", type=int, default=None, help="calibration partitions (default: the stage's)")
    ap.add_argument("--holdout", type=float, default=0.1, help="held-out prompt fraction (default %(default)g)")
    ap.add_argument("--evaluate", action="store_true",
                    help="time `requant evaluate --offline` (both replay modes) on the identity run's output")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir, removed after)")
    ap.add_argument("--out", default=None, help="JSON result path")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    c = dsv4_config(args.small)
    rows = args.rows or (4096 if args.small else 473_000)
    seqs = 16 if args.small else 256
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="requant-stage-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        master = fake_master(scratch / "master", c, dev, args.mxfp4)
        base = fake_base(scratch / "base", c, dev)
        n = synthetic_store(scratch / "store", c, rows, seqs, dev)
        setup = time.perf_counter() - t
        print(f"setup (not timed): fake master + base + {n:,}-row store in {setup:.1f} s on {dev}", flush=True)
        job = {"stores": [str(scratch / "store")], "master": str(master), "base": str(base), "workers": 1,
               "use_ray": False, "partitions": args.partitions, "holdout": args.holdout}
        runs = {}
        plan = [("identity_cold", "identity", 1, "data"), ("identity", "identity", 1, "data")]
        plan += [] if args.skip_full else [("full", "full", 1, "data")]
        plan += [("full_again", "full", 1, "data")] if args.full_twice and not args.skip_full else []
        plan += [("both", "both", 1, "data")] if args.both else []
        if args.gpus > 1:
            modes = ["data", "replicated"] if args.parallel == "both" else [args.parallel]
            plan += [(f"identity_{args.gpus}gpu_{m}", "identity", args.gpus, m) for m in modes]
        for name, replay, gpus, mode in plan:
            out = scratch / f"out-{name}"
            multi = {"use_ray": True} if args.ray and gpus > 1 else {"processes": gpus > 1}
            runs[name] = run({**job, "replay": replay, "workers": gpus, "parallel": mode, **multi}, out)
            if args.evaluate and name == "identity":
                runs["evaluate_offline"] = evaluate(out, scratch / "store")
            shutil.rmtree(out)
            r = runs[name]
            t = r["timings"]
            print(f"{name:22s} wall {r['wall_s']:6.2f} s  (load {r['slice']['load']:.2f}, replay {r['replay_s']:.2f}, "
                  f"reduce {r['reduce_s']:.2f}, gptq {t['gptq']:.2f}, "
                  + "".join(f"{k} {r['slice'][k]:.2f}, " for k in ("distance", "heldout_errors") if k in r["slice"])
                  + f"assemble {t['assemble']:.2f}, hash wait {t['hash_wait']:.2f}, "
                  f"report {t.get('report', 0):.2f}; peak GPU {r['peak_gpu_gib'] or 0:.1f} GiB; GB read per worker "
                  f"{[round(b / 1e9, 2) for b in r['bytes_read_per_worker']]})", flush=True)
            print(f"{'':22s} driver walls {({k: round(v, 2) for k, v in t.items()})}\n{'':22s} worker seconds "
                  f"{({k: round(v, 2) for k, v in r['slice'].items()})}", flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    best = runs["identity"]
    anchor = ANCHOR_S["hessians_gptq"] + ANCHOR_S["splice"]
    ours = best["wall_s"]
    print()
    print("| phase | ours (s) | anchor (s) |")
    print("|---|---|---|")
    print(f"| load master + replay (identity) + Hessians + GPTQ | {best['timings']['hessians_gptq']:.2f} | "
          f"~{ANCHOR_S['hessians_gptq']:.0f} (Hessians + GPTQ) |")
    print(f"| assemble (shard, index, config, links) + report + manifest | "
          f"{best['timings']['assemble'] + best['timings'].get('report', 0) + best['timings']['hash_wait']:.2f} | "
          f"~{ANCHOR_S['splice']:.0f} (splice) |")
    print(f"| whole stage | **{ours:.2f}** | ~{anchor:.0f} ({anchor / ours:.1f}× ours) |")
    same = runs["identity_cold"]["shard_sha256"] == best["shard_sha256"]
    print(f"shard bit-identical across the two identity runs: {same}")
    multis = {k: v for k, v in runs.items() if k.startswith(f"identity_{args.gpus}gpu")}
    for name, multi in multis.items():
        print(f"{name}: shard bit-identical with one GPU: {multi['shard_sha256'] == best['shard_sha256']}; "
              f"whole stage {multi['wall_s']:.2f} s, {ours / multi['wall_s']:.2f}× one GPU; replay "
              f"{multi['replay_s']:.2f} s ({best['replay_s'] / multi['replay_s']:.2f}× one GPU), reduce "
              f"{multi['reduce_s']:.2f} s for {max(multi['bytes_reduced_per_worker']) / 1e9:.1f} GB per worker")
    ratio = None
    if "full" in runs:
        ratio = runs["full"]["replay_s"] / best["replay_s"]
        print(f"replay cost: identity {best['replay_s']:.2f} s, full {runs['full']['replay_s']:.2f} s "
              f"(full/identity {ratio:.2f}×); whole stage with full replay {runs['full']['wall_s']:.2f} s")
    full_same = None
    if "full_again" in runs:
        full_same = runs["full"]["shard_sha256"] == runs["full_again"]["shard_sha256"]
        print(f"shard bit-identical across the two full-replay runs: {full_same}")
    if "both" in runs:
        b = runs["both"]
        print(f"replay both: whole stage {b['wall_s']:.2f} s; identity-vs-full w1/w3 Hessian distance per expert "
              f"(median, max) {b['hessian_distance_h_in_median_max']}")
    result = {"benchmark": "quantize_stage", "small": args.small, "rows": n, "mxfp4_master": args.mxfp4,
              "device": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "python": platform.python_version(), "config": c,
              "anchor_s": ANCHOR_S, "runs": runs, "whole_stage_s": ours, "target_s": 20.0,
              "full_over_identity_replay": ratio, "setup_s": setup,
              "multi_gpu_speedup": {k: ours / v["wall_s"] for k, v in multis.items()} or None,
              "reproducible_runs": same, "reproducible_full_runs": full_same,
              "multi_gpu_identical": {k: v["shard_sha256"] == best["shard_sha256"] for k, v in multis.items()} or None,
              "runner": "ray" if args.ray else "processes", "parallel": args.parallel,
              "date": time.strftime("%Y-%m-%d", time.gmtime()), "commit": os.environ.get("REQUANT_COMMIT")}
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()

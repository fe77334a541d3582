"""Prompt source: ultrachat-style records from the HF hub or a local parquet/jsonl file.

Schema (HuggingFaceH4/ultrachat_200k): ``prompt`` (str), ``prompt_id`` (str),
``messages`` (list of {"role", "content"}). A local file needs ``prompt`` or ``messages``;
``prompt_id`` defaults to a hash of the prompt text so reruns name prompts the same way.
"""
from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ULTRACHAT = "HuggingFaceH4/ultrachat_200k"


class PromptConfig(BaseModel):
    """Which prompts to send and how to generate for them (a capture or evaluate spec's
    ``prompts``, and the Python API)."""
    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(ULTRACHAT, description="hub dataset name, or a local .parquet / .jsonl / .json file")
    split: str = "train_sft"
    count: int | None = Field(None, ge=0, description="None: all")
    seed: int = 0
    shuffle: bool = True
    turns: Literal["first", "full"] = Field(
        "first", description="first: the first user turn only; full: every turn up to the last user turn")
    max_tokens: int = Field(256, ge=1, description="tokens generated per prompt")
    temperature: float = Field(0.0, ge=0.0, description="0: greedy")


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    messages: tuple  # ({"role": ..., "content": ...}, ...) ending with a user turn


def _is_local(source: str) -> bool:
    return source.endswith((".parquet", ".jsonl", ".json")) or os.path.exists(source)


def _load_dataset(cfg: PromptConfig):
    import datasets

    if _is_local(cfg.source):
        if not os.path.exists(cfg.source):
            raise FileNotFoundError(f"prompt file {cfg.source} does not exist")
        kind = "parquet" if cfg.source.endswith(".parquet") else "json"
        return datasets.load_dataset(kind, data_files=cfg.source, split="train")
    # Hub: datasets honours HF_HUB_OFFLINE / HF_DATASETS_OFFLINE and serves the local cache.
    return datasets.load_dataset(cfg.source, split=cfg.split)


def _messages(rec: dict, turns: str, where: str) -> tuple:
    msgs = rec.get("messages")
    if msgs:
        users = [i for i, m in enumerate(msgs) if m.get("role") == "user"]
        if not users:
            return ()
        if turns == "first":
            return ({"role": "user", "content": msgs[users[0]]["content"]},)
        return tuple({"role": m["role"], "content": m["content"]} for m in msgs[:users[-1] + 1])
    text = rec.get("prompt")
    if not isinstance(text, str):
        raise ValueError(f"{where}: record without 'messages' or a string 'prompt'")
    return ({"role": "user", "content": text},) if text.strip() else ()


def load_prompts(cfg: PromptConfig) -> list[Prompt]:
    """The sampled prompts, in feed order. Clear errors for a dataset without the expected
    columns and for zero prompts after filtering."""
    ds = _load_dataset(cfg)
    cols = set(ds.column_names)
    if not cols & {"prompt", "messages"}:
        raise ValueError(f"{cfg.source}: expected columns 'prompt' and/or 'messages' (ultrachat schema: "
                         f"prompt, prompt_id, messages); found {sorted(cols)}")
    order = list(range(len(ds)))
    if cfg.shuffle:
        random.Random(cfg.seed).shuffle(order)
    out: list[Prompt] = []
    seen: set[str] = set()
    for i in order:
        if cfg.count is not None and len(out) >= cfg.count:
            break
        rec = ds[i]
        msgs = _messages(rec, cfg.turns, f"{cfg.source} row {i}")
        if not msgs:
            continue
        pid = rec.get("prompt_id") or hashlib.sha256(msgs[0]["content"].encode()).hexdigest()
        pid = str(pid)
        if cfg.turns == "full" and "prompt_id" in rec:
            pid = f"{pid}:full"
        if pid in seen:  # the same prompt twice in a dataset is captured once
            continue
        seen.add(pid)
        out.append(Prompt(pid, msgs))
    if not out:
        raise ValueError(f"{cfg.source}: zero prompts after filtering (count={cfg.count}, turns={cfg.turns})")
    return out


SYNTH_TOPICS = ("the router", "a hessian", "expert load balance", "speculative decoding", "GPTQ", "a capture store",
                "int4 packing", "the MTP layer", "Ray actors", "a cron schedule", "zarr shards", "bf16 rounding")
SYNTH_ASKS = ("Explain", "Write a short poem about", "List three facts about", "Why does one care about",
              "Summarise", "Give an example of")


def write_synthetic(path: str | Path, n: int, seed: int = 0) -> Path:
    """A parquet of ``n`` synthetic prompts in the ultrachat schema (demo, tests; no hub)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    rows = {"prompt": [], "prompt_id": [], "messages": []}
    for i in range(n):
        text = f"{rng.choice(SYNTH_ASKS)} {rng.choice(SYNTH_TOPICS)} (#{i})."
        rows["prompt"].append(text)
        rows["prompt_id"].append(hashlib.sha256(text.encode()).hexdigest())
        rows["messages"].append([{"role": "user", "content": text},
                                 {"role": "assistant", "content": "A reply " + "word " * rng.randint(1, 5)},
                                 {"role": "user", "content": f"And more on {rng.choice(SYNTH_TOPICS)}?"}])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table(rows), tmp)
    os.replace(tmp, path)
    return path

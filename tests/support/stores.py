"""Capture stores of the tiny DeepSeek-V4's MTP row width: written by the real writer with a
ledger of their prompts (what the fault suite damages), or captured from the tiny DeepSeek-V4
itself with the hf engine (what the quantize stage's tests replay)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from requant.orchestrator.ledger import Ledger, ledger_path, request_id
from requant.storage import CaptureStore, Layout, StoreMeta

# Small chunks so the few hundred rows span several shards and index chunks.
LAYOUT = Layout(rows_per_chunk=64, chunks_per_shard=2, index_rows_per_chunk=8)
META = dict(hidden_size=512, hc_mult=4, model="tiny-dsv4")   # the tiny DSV4's MTP input rows

# What capture_dsv4 captures: 12 prompts (one held out at the stage's default 10%, 11 to
# calibrate on, more than 8 partitions' worth), DSV4_GEN tokens generated past each prompt
# (~35 rows a sequence, ~415 rows), in 16-row chunks so that a small replay memory bound
# really splits the store into several batches.
DSV4_PROMPTS = ["tell me about the expert router", "why quantize the hessian weight", "explain attention hidden state",
                "write a story about a number", "what is a group scale", "how does the model predict the next token",
                "list three prime numbers", "describe a quiet harbour at dawn", "what does a compiler do",
                "summarise the rules of chess", "why is the sky blue", "translate hello into french"]
DSV4_GEN = 20


def capture_dsv4(model: Path, store: str) -> str:
    """DSV4_PROMPTS through ``model`` (the tiny DeepSeek-V4) with the hf engine into ``store``."""
    from requant.hooks.hf_engine import HFCaptureConfig, capture_hf

    CaptureStore.create(store, StoreMeta(hidden_size=512, hc_mult=4, capture_point="target_pre_head", model=str(model)),
                        layout=Layout(rows_per_chunk=16))
    capture_hf(HFCaptureConfig(model=str(model), store=store, max_new_tokens=DSV4_GEN, stop_at_eos=False),
               DSV4_PROMPTS)
    return store


def stored_id(prompt: str) -> str:
    """What the capture plugin stores for a job's prompt (vLLM's request naming)."""
    return f"chatcmpl-{request_id(prompt)}-0f0f0f0f"


def bf16_rows(rng: np.random.Generator, t: int, width: int) -> np.ndarray:
    """Finite bf16 bit patterns (truncated normal floats)."""
    return (rng.standard_normal((t, width), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


def append(w, rng, seq: int, t: int, vocab: int, prompt: str, replica: int = 0) -> None:
    w.append_sequence(seq, bf16_rows(rng, t, 2048), rng.integers(0, vocab, t), np.arange(t), prompt_id=stored_id(prompt),
                      replica=replica)


def build_store(path: Path, groups: dict, seed: int, vocab: int, tail: list[int] = ()) -> set[str]:
    """A store written by GroupWriter (``groups``: writer group → sequence lengths), with a
    ledger of its prompts; rows of ``tail`` are written past w0's last commit (a writer killed
    before its commit record). Returns the prompt ids committed."""
    store = CaptureStore.create(str(path), StoreMeta(**META), LAYOUT)
    rng = np.random.default_rng(seed)
    prompts = []
    for r, (g, lengths) in enumerate(groups.items()):
        with store.writer(g, flush_rows=128) as w:
            for s, t in enumerate(lengths):
                prompts.append(f"{path.name}-{g}-{s}")
                append(w, rng, s, t, vocab, prompts[-1], replica=r)
    if tail:
        commit = (path / "writers/w0/zarr.json").read_bytes()
        with CaptureStore.open(str(path), "r+").writer("w0") as w:
            for j, t in enumerate(tail):
                append(w, rng, len(groups["w0"]) + j, t, vocab, f"{path.name}-tail-{j}")
        (path / "writers/w0/zarr.json").write_bytes(commit)
    led = Ledger(ledger_path(str(path)))
    led.mark_done(prompts)
    led.close()
    return set(prompts)

"""Shared inputs of the fault suite: the tiny DeepSeek-V4 checkpoint with its base, and two
capture stores of its row width written by the real writer (``a``: two writer groups, an
uncommitted tail; ``b``: another store, whose files replace ``a``'s)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from requant.orchestrator.ledger import Ledger, ledger_path, request_id
from requant.storage import CaptureStore, Layout, StoreMeta

# Small chunks so the few hundred rows span several shards and index chunks.
LAYOUT = Layout(rows_per_chunk=64, chunks_per_shard=2, index_rows_per_chunk=8)
META = dict(hidden_size=512, hc_mult=4, model="tiny-dsv4")   # the tiny DSV4's MTP input rows
A_GROUPS = {"w0": [23, 31, 17, 40, 12, 29, 35, 20, 26, 33, 15, 28],  # 309 rows: shard 2 partial
            "w1": [14, 22, 37, 19, 25]}
A_TAIL = [30, 25, 40]          # written past w0's commit (rows 309–404: into shard 2 and a shard 3)
B_GROUPS = {"w0": [30] * 14}    # 420 rows
SHARD = "model-mtp-w4a16.safetensors"


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
    """A store written by GroupWriter, with a ledger of its prompts; rows of ``tail`` are
    written past w0's last commit (a writer killed before its commit record). Returns the
    prompt ids committed."""
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


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    from requant.hooks import fixtures
    from requant.quantizer.base_fixture import make_base

    d = tmp_path_factory.mktemp("fault-ckpt")
    # The tiny DeepSeek-V4 with 4 routed experts of width 128 (not 8 × 256): the GPTQ of every
    # quantize run that succeeds is most of the suite's time, and nothing here needs more experts.
    config = fixtures.dsv4_config
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fixtures, "dsv4_config", lambda v: config(v) | {"n_routed_experts": 4,
                                                                    "moe_intermediate_size": 128})
        master = fixtures.make_dsv4(d / "master", seed=0)
    base = make_base(master, d / "base")
    sharded = make_base(master, d / "master-sharded", drop_mtp=False)  # the same master, indexed, 2 shards
    vocab = json.loads((master / "config.json").read_text())["vocab_size"]
    return {"master": master, "base": base, "sharded_master": sharded, "vocab": vocab}


@pytest.fixture(scope="session")
def stores(tmp_path_factory, checkpoint):
    d = tmp_path_factory.mktemp("fault-stores")
    a = build_store(d / "a", A_GROUPS, seed=1, vocab=checkpoint["vocab"], tail=A_TAIL)
    build_store(d / "b", B_GROUPS, seed=2, vocab=checkpoint["vocab"])
    return {"a": d / "a", "b": d / "b", "a_prompts": a}


@pytest.fixture(scope="session")
def quantized(stores, checkpoint, tmp_path_factory):
    """``requant quantize`` of the undamaged store and checkpoints: the shard every
    successful run on damaged input must reproduce byte for byte."""
    import hashlib

    from .harness import cli

    out = tmp_path_factory.mktemp("fault-ref") / "out"
    r = cli("quantize", "--store", str(stores["a"]), "--master", str(checkpoint["master"]),
            "--base", str(checkpoint["base"]), "--out", str(out), "--no-ray", "--quiet", "--device", "cpu")
    assert r.rc == 0, r.err
    return {"out": out, "shard": hashlib.sha256((out / SHARD).read_bytes()).hexdigest()}

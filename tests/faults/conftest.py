"""Shared inputs of the fault suite: the tiny DeepSeek-V4 checkpoint with its base, and two
capture stores of its row width written by the real writer (``a``: two writer groups, an
uncommitted tail; ``b``: another store, whose files replace ``a``'s)."""
from __future__ import annotations

import json

import pytest

from requant.testing.stores import build_store

A_GROUPS = {"w0": [23, 31, 17, 40, 12, 29, 35, 20, 26, 33, 15, 28],  # 309 rows: shard 2 partial
            "w1": [14, 22, 37, 19, 25]}
A_TAIL = [30, 25, 40]          # written past w0's commit (rows 309–404: into shard 2 and a shard 3)
B_GROUPS = {"w0": [30] * 14}    # 420 rows
SHARD = "model-mtp-w4a16.safetensors"


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    from requant.hooks import fixtures
    from requant.testing.base import make_base

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

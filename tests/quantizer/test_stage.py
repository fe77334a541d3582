"""The quantize stage end to end on the tiny DeepSeek-V4 fixture: a store captured with the hf
engine → assembled checkpoint. Checks the shard against an independent GPTQ of the replayed
Hessians decoded by compressed-tensors, the held-out errors against an independent
computation, the union index, the hard-linked base, the config through vLLM's
compressed-tensors parser, data-parallel replay on Ray (real local cluster) and in spawned
processes with 1, 2 and 4 workers — one killed mid-replay — against one process bit for bit,
the bad-input list and the CLI."""
import hashlib
import json
from contextlib import nullcontext
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from requant.quantizer.mtp.arch import load_block
from requant.quantizer.stage.assemble import AssembleConfig
from requant.quantizer.stage.base_files import INDEX
from requant.quantizer.stage.quant_config import merge_quant_config
from requant.quantizer.stage.distribute import KILL_ENV, plan_slices
from requant.quantizer.core.gptq import GPTQConfig, gptq_batched
from requant.quantizer.stage.partition import plan_partitions
from requant.quantizer.core.quant import QuantSpec, dequantize
from requant.quantizer.stage.replay import ReplayConfig, route_counts, split_hessians
from requant.quantizer.stage.run import MANIFEST, QuantizeJob, format_summary, run_quantize
from requant.storage import CaptureStore, StoreMeta
from requant.testing.base import checked_weight_map
from requant.testing.stores import DSV4_GEN as GEN, DSV4_PROMPTS as PROMPTS

SHARD = "model-mtp-w4a16.safetensors"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_dsv4, tiny_dsv4_base, dsv4_capture):
    d = tmp_path_factory.mktemp("stage4")
    ckpt, store, base = tiny_dsv4, dsv4_capture, tiny_dsv4_base
    base_hashes = {p.name: _sha(p) for p in base.glob("*.safetensors")}
    out = d / "out"
    # plain GPTQ (the damp policy), which test_shard_decodes_to_independent_gptq reproduces independently;
    # the other runs here use the default policy (shrink)
    res = run_quantize(QuantizeJob(stores=[store], master=str(ckpt), base=str(base), out=str(out), replay="both",
                                   low_tokens="damp"), progress=False)
    return {"d": d, "ckpt": ckpt, "store": store, "base": base, "base_hashes": base_hashes, "out": out, "res": res}


@pytest.fixture(scope="module")
def manifest(env) -> dict:
    return json.loads((env["out"] / MANIFEST).read_text())


@pytest.fixture(scope="module")
def shard(env) -> dict:
    return load_file(str(env["out"] / SHARD))


EXPERTS = {f"mtp.0.ffn.experts.{e}.{p}" for e in range(8) for p in ("w1", "w2", "w3")}


def test_output_layout_and_no_temp_dir_left(env):
    out, res = env["out"], env["res"]
    assert res.out == out and res.shard == out / SHARD and res.report.exists() and res.manifest.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.tmp")]  # temp dir renamed away
    for f in ("config.json", INDEX, "tokenizer.json", "tokenizer_config.json", "generation_config.json",
              "tokens_per_expert.png", "gptq_vs_rtn.png", "hessian_distance.png", "heldout_gptq_vs_rtn.png",
              "insample_vs_heldout.png"):
        assert (out / f).exists(), f


def test_base_shards_are_hard_linked_and_unchanged(env):
    for name, h in env["base_hashes"].items():
        assert os.path.samefile(env["out"] / name, env["base"] / name)
        assert _sha(env["base"] / name) == h


def test_shard_holds_packed_experts_and_the_other_mtp_tensors_raw(env, shard):
    """8 experts × 3 projections × 3 tensors + every other mtp.0.* tensor of the master, raw."""
    with safe_open(str(env["ckpt"] / "model.safetensors"), "pt") as f:
        master = {k: f.get_tensor(k) for k in f.keys()}
    passthrough = {k for k in master if k.startswith("mtp.0.") and k.rsplit(".", 1)[0] not in EXPERTS}
    packed = {f"{m}.{s}" for m in EXPERTS for s in ("weight_packed", "weight_scale", "weight_shape")}
    assert set(shard) == passthrough | packed
    for k in passthrough:
        assert shard[k].dtype == master[k].dtype and torch.equal(shard[k], master[k]), k


def test_union_index_lists_every_tensor_once_where_it_lives(env, shard):
    index = checked_weight_map(env["out"])
    assert all(index[k] == SHARD for k in shard)
    base_index = json.loads((env["base"] / INDEX).read_text())["weight_map"]
    assert {k: v for k, v in index.items() if v != SHARD} == base_index


def test_manifest_rows_partitions_and_routing(manifest):
    m = manifest
    rows, s = m["stores"][0]["rows"], m["summary"]
    assert rows == s["rows"] == s["rows_calibration"] + s["rows_heldout"] > 200 and m["stores"][0]["id"]
    assert m["partitions"]["heldout"]["prompts"] == 1 and m["partitions"]["calibration"]["prompts"] == 11
    assert 0 < s["rows_heldout"] < rows / 4
    assert sum(m["tokens_per_expert"]) == s["rows_calibration"] * 2 == sum(m["tokens_per_expert_identity"])  # top-2
    assert sum(m["tokens_per_expert_heldout"]) == s["rows_heldout"] * 2
    assert m["workers"][0]["bytes_read"] == s["bytes_read_per_worker"][0] > 0


def test_manifest_tensors_inputs_and_run(env, manifest):
    m = manifest
    assert len(m["tensors"]) == 24 and {r["path"] for r in m["tensors"]} <= {"gptq", "gptq_damp_retry"}
    assert all(r["damp"] == 0.01 for r in m["tensors"] if r["path"] == "gptq")
    assert m["gptq"]["low_tokens"]["kind"] == "damp"
    assert all(r["err_gptq"] < r["err_rtn"] for r in m["tensors"])
    assert len(m["inputs"]["master"]["mtp_tensors_sha256"]) == 64 and set(m["inputs"]["base"]["shards"]) == set(
        env["base_hashes"])
    assert set(m["hessian_distance"]) == {str(e) for e in range(8)}
    assert all(0 < v[0] and 0 < v[1] for v in m["hessian_distance"].values())
    assert m["replay"] == "both" and m["versions"]["torch"] and m["timings"]["hessians_gptq"] > 0


def test_manifest_memory_per_step_beside_the_estimate(manifest):
    """Each step's peak RSS (CPU) beside the plan's estimate of it, and the limit checked."""
    mem, s = manifest["memory"], manifest["summary"]
    steps = mem["workers"][0]["steps"]
    assert mem["measured_kind"] == "host" and mem["limit"] > mem["estimate"]["peak"] > 0
    assert {"load", "replay heldout/full", "replay calibration/identity", "reduce calibration/full", "gptq"} <= set(
        steps) <= set(mem["estimate"]["steps"])
    assert all(v["host"] > 0 for v in steps.values()) and s["peak_memory_per_worker"] == [max(
        v["host"] for v in steps.values())]


def test_report_sections(env, manifest):
    report = env["res"].report.read_text()
    assert "Identity vs full replay" in report and "GPTQ vs RTN, in-sample" in report
    assert "GPTQ vs RTN on held-out prompts" in report and "in-sample" in manifest["error_definitions"]["err_gptq"]


def test_shard_decodes_to_independent_gptq(env):
    """compressed-tensors 0.17 decompresses every packed tensor to exactly the weights an
    independent run of plain GPTQ (replay → Hessians → gptq_batched, same batches) produces: the
    module's run names the damp policy."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    block = load_block(env["ckpt"], device="cpu")
    plan = plan_partitions([env["store"]])  # the job's defaults: 10% of the prompts held out
    h_in, h_mid, _ = split_hessians(block, plan, "calibration", ReplayConfig(mode="full", device="cpu"))
    res = SimpleNamespace(h_in=h_in, h_mid=h_mid)
    w1, w2, w3 = block.expert_weights()
    m = json.loads((env["out"] / MANIFEST).read_text())
    batch = m["gptq"]["batch"]
    spec = QuantSpec()
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=4, type="int", symmetric=True,
                                                                             strategy="group", group_size=128))
    shard = load_file(str(env["out"] / SHARD))
    for b0 in range(0, 8, batch):
        ids = list(range(b0, min(b0 + batch, 8)))
        for projs, hs, w in ((("w1", "w3"), res.h_in, torch.cat([w1, w3], 1)), (("w2",), res.h_mid, w2)):
            out = gptq_batched(w[ids].float(), hs.mean(ids), GPTQConfig())
            deq = dequantize(out.q, out.scale, spec).bfloat16()
            rows = deq.shape[1] // len(projs)
            for j, e in enumerate(ids):
                for k, p in enumerate(projs):
                    name = f"mtp.0.ffn.experts.{e}.{p}"
                    ct = {s: shard[f"{name}.{s}"] for s in ("weight_packed", "weight_scale", "weight_shape")}
                    back = PackedQuantizationCompressor.decompress(ct, scheme)["weight"]
                    assert torch.equal(back.bfloat16(), deq[j, k * rows:(k + 1) * rows]), name


def test_config_accepted_by_vllm_parser(env):
    """vLLM's CompressedTensorsConfig parses the merged config; its matcher gives the MTP routed
    experts (checkpoint and vLLM module names) the W4A16 scheme, and ignores the MTP's other
    linears and nothing of the base."""
    from torch import nn
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig

    cfg = json.loads((env["out"] / "config.json").read_text())
    qc = CompressedTensorsConfig.from_config(cfg["quantization_config"])
    layer = nn.Linear(8, 8)
    n = cfg["num_hidden_layers"]
    for name in ["mtp.0.ffn.experts.5.w1", "mtp.0.ffn.experts.0.w2", f"model.layers.{n}.mtp_block.ffn.experts.0.w3"]:
        sd = qc.get_scheme_dict(layer, name)
        assert sd is not None, name
        w = sd["weights"]
        assert (w.num_bits, w.group_size, w.symmetric, w.strategy, sd["format"]) == (4, 128, True, "group",
                                                                                     "pack-quantized"), name
    for name in ["mtp.0.attn.wq_a", "mtp.0.e_proj", "mtp.0.ffn.shared_experts.w2", "mtp.0.ffn.gate"]:
        assert qc.get_scheme_dict(layer, name) is None, name
    assert qc.get_scheme_dict(layer, "layers.0.ffn.experts.0.w1") is None   # base experts untouched
    assert cfg["quantization_config"]["ignore"] and not set(cfg["quantization_config"]["ignore"]) & {
        f"mtp.0.ffn.experts.{e}.{p}" for e in range(8) for p in ("w1", "w2", "w3")}


def test_merge_keeps_base_config_and_refuses_conflicts(env):
    from requant.quantizer.mtp.arch import load_spec

    master_cfg = json.loads((env["ckpt"] / "config.json").read_text())
    spec = load_spec(master_cfg)
    base_group = {"targets": ["re:^layers\\.\\d+\\.ffn\\.experts\\.\\d+\\.(w1|w2|w3)$"],
                  "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128},
                  "format": "pack-quantized"}
    base_qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": base_group},
               "ignore": ["lm_head", "re:^mtp\\..*"], "kv_cache_scheme": None}
    base_modules = ["layers.0.ffn.experts.0.w1", "head", "lm_head"]
    qc, notes = merge_quant_config(base_qc, spec, master_cfg, ["mtp.0.e_proj"], [], base_modules, AssembleConfig())
    assert list(qc["config_groups"]) == ["group_mtp_experts", "group_0"] and qc["config_groups"]["group_0"] == base_group
    # the MTP's unquantised linears under the checkpoint name and vLLM's (model.layers.{n}.*), the shared head too
    assert qc["ignore"] == ["lm_head", "mtp.0.e_proj", "model.layers.2.e_proj", "mtp.0.shared_head.head",
                            "model.layers.2.head"] and "kv_cache_scheme" in qc
    assert any("re:^mtp" in n for n in notes)
    bad = dict(base_qc, ignore=["re:.*experts.*"])
    with pytest.raises(ValueError, match="matches the MTP routed experts and base modules"):
        merge_quant_config(bad, spec, master_cfg, [], [], base_modules, AssembleConfig())
    with pytest.raises(ValueError, match="quant_method 'fp8'"):
        merge_quant_config({"quant_method": "fp8"}, spec, master_cfg, [], [], base_modules, AssembleConfig())


def test_base_shard_of_only_mtp_tensors_is_dropped_and_named(env, tmp_path):
    """A base shard that holds nothing but an old MTP layer is left out of the output, and the
    manifest's assembly facts name it (with its note), beside the linked shards."""
    from requant.quantizer.mtp.arch import load_spec
    from requant.quantizer.stage.assemble import PACKED_SUFFIXES, write_assembly
    from requant.quantizer.stage.base_files import read_base

    base = tmp_path / "base"
    base.mkdir()
    for p in env["base"].iterdir():
        os.link(p, base / p.name)
    with safe_open(str(env["ckpt"] / "model.safetensors"), "pt") as f:
        old_mtp = {k: f.get_tensor(k) for k in f.keys() if k.startswith("mtp.0.") and "experts" not in k}
    save_file(old_mtp, str(base / "model-old-mtp.safetensors"))
    index = json.loads((env["base"] / INDEX).read_text())
    index["weight_map"] |= {k: "model-old-mtp.safetensors" for k in old_mtp}
    (base / INDEX).unlink()
    (base / INDEX).write_text(json.dumps(index))
    config, index = read_base(base)
    master_cfg = json.loads((env["ckpt"] / "config.json").read_text())
    packed = {k: v for k, v in load_file(str(env["out"] / SHARD)).items() if k.endswith(PACKED_SUFFIXES)}
    out = tmp_path / "out"
    out.mkdir()
    facts = write_assembly(out, base, config, index, load_spec(master_cfg), env["ckpt"], master_cfg, packed,
                           AssembleConfig(), durable=False)
    assert facts["base_shards"] == {f: "hardlink" for f in env["base_hashes"]} | {"model-old-mtp.safetensors": "dropped"}
    assert facts["base_mtp_entries_dropped"] == len(old_mtp)
    assert f"{len(old_mtp)} MTP tensors of the base superseded: model-old-mtp.safetensors dropped" in facts["notes"]
    assert not (out / "model-old-mtp.safetensors").exists()
    assert "model-old-mtp.safetensors" not in json.loads((out / INDEX).read_text())["weight_map"].values()


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    if ray.is_initialized():  # another module's cluster: use it, leave it to its owner
        yield
        return
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_heldout_errors_match_an_independent_computation(env):
    """Held-out figures: the held-out Hessians cover exactly the held-out prompts' rows (with
    the calibration tokens, the router's counts over the whole store), and each tensor's
    held-out error is tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) of the shard's weights (integers unpacked by
    compressed-tensors × group scales, as the in-sample figure dequantises) on those Hessians,
    recomputed here in float64; RTN's too."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    from requant.quantizer.core.quant import rtn

    m = json.loads((env["out"] / MANIFEST).read_text())
    block = load_block(env["ckpt"], device="cpu")
    every = route_counts(block, [env["store"]], ReplayConfig(mode="full", device="cpu"))
    assert [a + b for a, b in zip(m["tokens_per_expert"], m["tokens_per_expert_heldout"])] == every.tolist()
    plan = plan_partitions([env["store"]])
    h_in, h_mid, tokens = split_hessians(block, plan, "heldout", ReplayConfig(mode="full", device="cpu"))
    assert tokens.tolist() == m["tokens_per_expert_heldout"]
    shard = load_file(str(env["out"] / SHARD))
    w = dict(zip(("w1", "w2", "w3"), block.expert_weights()))
    flagged = []
    for r in m["tensors"]:
        e, proj = r["expert"], r["proj"]
        h = (h_mid if proj == "w2" else h_in).h[e].double()
        assert r["tokens_heldout"] == int(tokens[e])
        if not tokens[e]:
            assert r["err_gptq_heldout"] is None and r["heldout_not_below_rtn"] is None
            continue
        shape = torch.Size(shard[f"{r['name']}.weight_shape"].tolist())
        q = unpack_from_int32(shard[f"{r['name']}.weight_packed"], 4, shape).double()
        wq = q * shard[f"{r['name']}.weight_scale"].double().repeat_interleave(128, dim=1)
        w0 = w[proj][e].double()
        q, sc = rtn(w[proj][e].float(), QuantSpec())
        wr = dequantize(q, sc, QuantSpec()).double()

        def err(x):
            d = w0 - x
            return float(torch.trace(d @ h @ d.T) / torch.trace(w0 @ h @ w0.T))

        assert r["err_gptq_heldout"] == pytest.approx(err(wq), rel=1e-5), r["name"]
        assert r["err_rtn_heldout"] == pytest.approx(err(wr), rel=1e-5), r["name"]
        assert r["heldout_not_below_rtn"] == (r["err_gptq_heldout"] >= r["err_rtn_heldout"])
        flagged += [r["name"]] if r["heldout_not_below_rtn"] else []
    assert m["heldout_not_below_rtn"] == flagged and m["summary"]["heldout_not_below_rtn"] == len(flagged)
    report = (env["out"] / "report.md").read_text()
    assert all(f"`{n}`" in report for n in flagged)


def test_worker_count_and_a_killed_worker_do_not_change_the_shard(env, ray_cluster, tmp_path, monkeypatch):
    """Data-parallel replay over 8 calibration partitions, folded in windows of whole sequences:
    1 worker in this process, 2 and 4 Ray actors, 2 and 4 spawned processes — in the 4-worker
    runs one worker is killed (os._exit) after folding the first of its 2 partitions, and its
    replacement reruns them — and replicated replay in 2 processes: one shard, bit for bit.
    Every worker reads only its partitions (the bytes add up to one reading of the store) and
    ran outside this process."""
    assert plan_slices(8, 2, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]] and plan_slices(8, 4, 3)[2] == []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # every worker runs with the driver's thread count: 1 here (2 cores)
    try:
        _all_runs_one_shard(env, tmp_path, monkeypatch)
    finally:
        torch.set_num_threads(threads)


def _all_runs_one_shard(env, tmp_path, monkeypatch):
    # 16-row fold windows: a partition of two sequences folds twice (windows of whole batches)
    job = dict(stores=[env["store"]], master=str(env["ckpt"]), base=str(env["base"]), replay="full", partitions=8,
               gptq_batch=2, fold_rows=16, durable=False)
    one = run_quantize(QuantizeJob(out=str(tmp_path / "one"), **job), progress=False)
    ref, whole = _sha(one.shard), one.summary["bytes_read_per_worker"][0]
    assert one.summary["workers"] == 1 and one.summary["partitions"] == 8
    assert json.loads(one.manifest.read_text())["gptq"]["low_tokens"]["kind"] == "shrink"  # the default's pooling
    runs = [("ray2", dict(workers=2, use_ray=True), None), ("ray4", dict(workers=4, use_ray=True), 2),
            ("proc2", dict(workers=2, use_ray=False, processes=True), None),
            ("proc4", dict(workers=4, use_ray=False, processes=True), 1),
            ("proc2-replicated", dict(workers=2, use_ray=False, processes=True, parallel="replicated"), None)]
    for name, kw, kill in runs:
        marker = tmp_path / f"killed-{name}"
        if kill is not None:
            monkeypatch.setenv(KILL_ENV, f"{marker}:{kill}")
        data = kw.get("parallel", "data") == "data"
        with pytest.warns(UserWarning, match=r"workers replay no heldout partition") if data else nullcontext():
            r = run_quantize(QuantizeJob(out=str(tmp_path / name), **job, **kw), progress=False)
        monkeypatch.delenv(KILL_ENV, raising=False)
        m = json.loads(r.manifest.read_text())
        assert _sha(r.shard) == ref, name
        assert r.summary["workers"] == kw["workers"] and r.summary["ray"] == kw["use_ray"], name
        pids = {p for w in m["workers"] for p in w["replay_pids"]}
        assert os.getpid() not in pids, name
        if kw.get("parallel") == "replicated":
            assert r.summary["bytes_read_per_worker"] == [whole, whole], name
            continue
        cal = [w["partitions"]["calibration/full"] for w in m["workers"]]
        assert sorted(i for c in cal for i in c) == list(range(8)) and all(len(c) == 8 // kw["workers"] for c in cal)
        assert r.summary["idle_replay_workers"] == {"heldout": kw["workers"] - 1}  # one held-out partition
        if kill is None:
            assert sum(r.summary["bytes_read_per_worker"]) == whole and max(r.summary["bytes_read_per_worker"]) < whole
            continue
        lost = m["workers"][kill]
        assert marker.exists() and int(marker.read_text()) in lost["replay_pids"]  # killed mid-replay …
        assert lost["pid"] != int(marker.read_text()) and lost["caught_up"] == ["heldout/full"]  # … and replaced


def test_partition_sums_refuse_another_plan_and_double_folds(env):
    """A worker's sums belong to one partition plan: partitions of a plan with another
    partition count (a retry that changed it) or a partition folded twice are errors."""
    from requant.quantizer.stage.replay import new_sums, replay_partitions
    from requant.storage import StoreReader

    block = load_block(env["ckpt"], device="cpu")
    cfg = ReplayConfig(mode="identity", device="cpu")
    four, eight = plan_partitions([env["store"]], partitions=4), plan_partitions([env["store"]], partitions=8)
    assert four.id != eight.id
    sums = new_sums(block, four, "calibration", "identity", None, "cpu")
    with StoreReader([env["store"]]) as reader:
        replay_partitions(block, reader, four, sums, [0], cfg)
        with pytest.raises(ValueError, match=r"differs from the plan .* \(the partition count or the stores changed\)"):
            replay_partitions(block, reader, eight, sums, [1], cfg)
        with pytest.raises(ValueError, match="calibration partition 0 added twice"):
            replay_partitions(block, reader, four, sums, [0], cfg)
    assert sums.partitions == [0] and sums.rows == four.calibration[0].rows


def test_row_bounds_hold_on_the_fixture(env):
    """The a-priori bounds behind the fixed-point grid hold for every replayed row — and are
    not absurdly loose (within 2^20 of the largest contribution seen)."""
    from requant.quantizer.core.hessian import swiglu_intermediate
    from requant.quantizer.stage.replay import _chunks, row_bounds
    from requant.storage import StoreReader

    block = load_block(env["ckpt"], device="cpu")
    b_in, b_mid = row_bounds(block)
    w1, _, w3 = block.expert_weights()
    seen_in, seen_mid = 0.0, torch.zeros(8, dtype=torch.float64)
    with StoreReader([env["store"]]) as reader, torch.no_grad():
        for hidden, tok, pos, lens in _chunks(reader, ReplayConfig(mode="full", device="cpu")):
            x, ids, _ = block.moe_inputs(hidden, tok, pos, "full", lens)
            seen_in = max(seen_in, float(x.float().square().amax()))
            for e in range(8):
                a = swiglu_intermediate(x[(ids == e).any(1)], w1[e], w3[e], block.spec.swiglu_limit)
                if a.numel():
                    seen_mid[e] = max(seen_mid[e], float(a.float().square().amax()))
    assert seen_in <= float(b_in[0]) < seen_in * 2 ** 20
    assert bool((seen_mid <= b_mid).all()) and bool((b_mid < seen_mid * 2 ** 20).all())


# -- bad input: a clear error, no output, no temp dir ---------------------------------------

def _no_output(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in parent.iterdir() if ".tmp-" in p.name]


def test_output_exists_is_refused_untouched(env, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="already exists"):
        run_quantize(QuantizeJob(stores=[env["store"]], master=str(env["ckpt"]), base=str(env["base"]), out=str(out)),
                     progress=False)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_memory_limit_too_small_is_refused_before_any_work(env, tmp_path):
    """A per-worker memory limit the plan's estimate exceeds: refused before a worker starts,
    the error names the step, its parts and the limit in GiB; nothing written."""
    from requant.quantizer.core.memory import MemoryLimitError

    job = dict(stores=[env["store"]], master=str(env["ckpt"]), base=str(env["base"]), out=str(tmp_path / "o"))
    with pytest.raises(MemoryLimitError, match=r"the plan needs ~0\.\d+ GiB per worker at its peak \(replay "
                       r"calibration/identity: .* GiB\) but the memory limit is 0\.0195 GiB \(memory_limit\); "
                       r"try fewer rows per block call \(--max-rows\)") as e:
        run_quantize(QuantizeJob(memory_limit=20 << 20, **job), progress=False)
    assert all(f"{part} 0.0" in str(e.value) for part in ("int64 sums (upper triangles)", "fp32 partial", "activations"))
    _no_output(tmp_path, tmp_path / "o")


def test_store_master_mismatch_and_empty_store(env, tmp_path):
    wrong = str(tmp_path / "wrong")
    CaptureStore.create(wrong, StoreMeta(hidden_size=256, hc_mult=4))
    job = dict(master=str(env["ckpt"]), base=str(env["base"]), out=str(tmp_path / "o"))
    with pytest.raises(ValueError, match=r"store hidden_size 256 != MTP hidden_size 512"):
        run_quantize(QuantizeJob(stores=[wrong], **job), progress=False)
    hc = str(tmp_path / "hc")
    CaptureStore.create(hc, StoreMeta(hidden_size=512, hc_mult=1))
    with pytest.raises(ValueError, match=r"store hc_mult 1 != MTP hc_mult 4"):
        run_quantize(QuantizeJob(stores=[hc], **job), progress=False)
    empty = str(tmp_path / "empty")
    CaptureStore.create(empty, StoreMeta(hidden_size=512, hc_mult=4))
    with pytest.raises(ValueError, match="0 committed rows"):
        run_quantize(QuantizeJob(stores=[env["store"], empty], **job), progress=False)
    # stores of different widths: the one the master cannot replay is named
    with pytest.raises(ValueError, match=rf"{wrong}: store hidden_size 256 != MTP hidden_size 512"):
        run_quantize(QuantizeJob(stores=[env["store"], wrong], **job), progress=False)
    _no_output(tmp_path, tmp_path / "o")


def test_heldout_split_and_partition_count_errors(env, tmp_path):
    """A held-out fraction that holds no prompt out, or leaves none to calibrate on, and more
    partitions than sequences: clear errors before any work, nothing written."""
    job = dict(stores=[env["store"]], master=str(env["ckpt"]), base=str(env["base"]), out=str(tmp_path / "o"))
    with pytest.raises(ValueError, match=r"held-out fraction 0.01 of 12 prompt\(s\) holds none out"):
        run_quantize(QuantizeJob(holdout=0.01, **job), progress=False)
    with pytest.raises(ValueError, match=r"held-out fraction 0.97 of 12 prompt\(s\) leaves none for calibration"):
        run_quantize(QuantizeJob(holdout=0.97, **job), progress=False)
    with pytest.raises(ValueError, match=r"40 calibration partitions but only 11 calibration sequence"):
        run_quantize(QuantizeJob(partitions=40, **job), progress=False)
    with pytest.raises(ValueError, match=r"holdout must be in \[0, 1\)"):
        QuantizeJob(holdout=1.0, **job)
    _no_output(tmp_path, tmp_path / "o")


def test_missing_mtp_tensors_and_bad_base(env, tmp_path):
    ckpt, base = env["ckpt"], env["base"]
    sd = load_file(str(ckpt / "model.safetensors"))
    broken = tmp_path / "master"
    broken.mkdir()
    (broken / "config.json").write_text((ckpt / "config.json").read_text())
    save_file({k: v for k, v in sd.items() if not k.startswith("mtp.0.ffn.experts.3.")}, str(broken / "model.safetensors"))
    job = dict(stores=[env["store"]], out=str(tmp_path / "o"))
    with pytest.raises(ValueError, match=r"missing 3 routed-expert tensors.*mtp\.0\.ffn\.experts\.3\.w1\.weight"):
        run_quantize(QuantizeJob(master=str(broken), base=str(base), **job), progress=False)
    noattn = tmp_path / "noattn"
    noattn.mkdir()
    (noattn / "config.json").write_text((ckpt / "config.json").read_text())
    save_file({k: v for k, v in sd.items() if k != "mtp.0.attn.wq_a.weight"}, str(noattn / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing mtp\.0\.attn\.wq_a\.weight"):
        run_quantize(QuantizeJob(master=str(noattn), base=str(base), **job), progress=False)
    nomtp = tmp_path / "nomtp"
    nomtp.mkdir()
    (nomtp / "config.json").write_text((ckpt / "config.json").read_text())
    save_file({k: v for k, v in sd.items() if not k.startswith("mtp.")}, str(nomtp / "model.safetensors"))
    with pytest.raises(ValueError, match=r"no mtp\.0\.\* tensors"):
        run_quantize(QuantizeJob(master=str(nomtp), base=str(base), **job), progress=False)
    # base without an index (the fixture itself is one unindexed file)
    with pytest.raises(FileNotFoundError, match="has no model.safetensors.index.json"):
        run_quantize(QuantizeJob(master=str(ckpt), base=str(ckpt), **job), progress=False)
    # base of another model
    other = tmp_path / "other"
    other.mkdir()
    for p in base.iterdir():
        (other / p.name).symlink_to(p)
    (other / "config.json").unlink()
    cfg = json.loads((base / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(cfg, n_routed_experts=16)))
    with pytest.raises(ValueError, match="base config n_routed_experts = 16 but master config n_routed_experts = 8"):
        run_quantize(QuantizeJob(master=str(ckpt), base=str(other), **job), progress=False)
    _no_output(tmp_path, tmp_path / "o")


def test_cli_quantize(env, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "requant.orchestrator.cli", "quantize", "--store", env["store"],
           "--master", str(env["ckpt"]), "--base", str(env["base"]), "--out", str(out), "--no-ray"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "24 tensors of 8 DSV4 MTP experts" in r.stdout and "GPTQ tensors" in r.stderr  # summary + tqdm bars
    assert "held-out rel. output error GPTQ" in r.stdout and "in-sample" in r.stdout
    assert (out / SHARD).exists() and (out / "report.md").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr


def test_quantize_experts_on_a_slice_of_rows_equals_full_stack():
    """A worker hands GPTQ only its experts' weights (``rows`` maps id → row, as on its GPU):
    same tensors and records as indexing the full stack."""
    from requant.quantizer.core.experts import ExpertQuantConfig, quantize_experts
    from requant.quantizer.core.hessian import HessianSet

    g = torch.Generator().manual_seed(0)
    E, D, I = 6, 256, 128
    w1, w3, w2 = (torch.randn(E, I, D, generator=g) * 0.05).bfloat16(), (torch.randn(E, I, D, generator=g) * 0.05).bfloat16(), \
        (torch.randn(E, D, I, generator=g) * 0.05).bfloat16()
    mine = torch.tensor([3, 4, 5])
    h_in, h_mid = HessianSet(E, D, experts=mine), HessianSet(E, I, experts=mine)
    x = torch.randn(400, D, generator=g).bfloat16()
    ids = torch.randint(0, E, (400, 2), generator=g)
    h_in.add(x, ids)
    h_mid.add(torch.randn(400, I, generator=g).bfloat16(), ids)
    cfg = ExpertQuantConfig(batch_size=2, device="cpu")
    pooled = (torch.eye(D) * 0.5, torch.eye(I) * 0.5)  # the default (shrink) pools all experts: given, on a slice
    full = quantize_experts(w1, w2, w3, h_in, h_mid, cfg, pooled=pooled)
    part = quantize_experts(w1[mine], w2[mine], w3[mine], h_in, h_mid, cfg, rows={3: 0, 4: 1, 5: 2}, pooled=pooled)
    assert full[0].keys() == part[0].keys() and all(torch.equal(full[0][k], part[0][k]) for k in full[0])
    assert [r.as_dict() for r in full[1]] == [r.as_dict() | {"seconds": r2.seconds} for r, r2 in zip(part[1], full[1])]


def test_fp8_passthrough_renames_scales_to_the_base_convention(env, tmp_path):
    """An FP8 master (attention linears E4M3 + E8M0 `.scale`, as upstream DSV4): pass-through
    carries the same bytes with the scale named as the base names it (`.weight_scale_inv` here);
    into a base without an FP8 group (vLLM builds those modules unquantised) the stage writes
    them dequantised to BF16 without a scale, lists them in `ignore` and in the manifest."""
    from requant.quantizer.stage.assemble import passthrough_tensors, resolve_fp8_scale
    from requant.quantizer.mtp.arch import load_spec

    ckpt = env["ckpt"]
    sd = load_file(str(ckpt / "model.safetensors"))
    fp8 = {}
    for name in ("attn.wq_a", "attn.wkv", "e_proj"):
        w = sd.pop(f"mtp.0.{name}.weight").float()
        o, i = w.shape
        fp8[f"mtp.0.{name}.weight"] = w.to(torch.float8_e4m3fn)  # block scale 1.0 = E8M0 byte 127
        fp8[f"mtp.0.{name}.scale"] = torch.full((-(-o // 128), -(-i // 128)), 127, dtype=torch.uint8).view(
            torch.float8_e8m0fnu)
    master = tmp_path / "fp8"
    master.mkdir()
    (master / "config.json").write_text((ckpt / "config.json").read_text())
    save_file({**sd, **fp8}, str(master / "model.safetensors"))
    spec = load_spec(json.loads((ckpt / "config.json").read_text()))
    assert resolve_fp8_scale(AssembleConfig(), ["layers.0.attn.wkv.weight_scale_inv"]) == ".weight_scale_inv"
    assert resolve_fp8_scale(AssembleConfig(), ["layers.0.attn.wkv.scale"]) == ".scale"
    assert resolve_fp8_scale(AssembleConfig(), ["a.weight"]) == "keep"
    tensors, modules = passthrough_tensors(master, spec, ".weight_scale_inv")
    assert sorted(modules) == ["mtp.0.attn.wkv", "mtp.0.attn.wq_a", "mtp.0.e_proj"]
    for m in modules:
        assert f"{m}.scale" not in tensors
        assert tensors[f"{m}.weight_scale_inv"].dtype == torch.float8_e8m0fnu
        assert torch.equal(tensors[f"{m}.weight_scale_inv"].view(torch.uint8), fp8[f"{m}.scale"].view(torch.uint8))
        assert torch.equal(tensors[f"{m}.weight"].view(torch.uint8), fp8[f"{m}.weight"].view(torch.uint8))
    res = run_quantize(QuantizeJob(stores=[env["store"]], master=str(master), base=str(env["base"]),
                                   out=str(tmp_path / "o"), fp8_scale=".weight_scale_inv"), progress=False)
    shard = load_file(str(res.shard))
    for m in modules:  # block scale 1: the dequantised weight is the E4M3 value itself
        assert torch.equal(shard[f"{m}.weight"], fp8[f"{m}.weight"].float().bfloat16()), m
        assert not [n for n in shard if n.startswith(m + ".") and n != f"{m}.weight"], m
    m = json.loads(res.manifest.read_text())
    assert m["assembly"]["fp8_scale_suffix"] == ".weight_scale_inv"
    assert sorted(m["assembly"]["fp8_dequantised"]) == sorted(modules) and m["assembly"]["fp8_modules"] == []
    assert any("3 FP8 MTP modules dequantised" in n for n in m["assembly"]["notes"])
    ignore = json.loads((res.out / "config.json").read_text())["quantization_config"]["ignore"]
    assert {"mtp.0.attn.wkv", "model.layers.2.attn.wkv", "mtp.0.e_proj", "model.layers.2.e_proj"} <= set(ignore)
    seen = []
    res2 = run_quantize(QuantizeJob(stores=[env["store"]], master=str(master), base=str(env["base"]),
                                    out=str(tmp_path / "o2"), holdout=0), progress=lambda *a: seen.append(a))
    assert res2.summary["rows_heldout"] == 0 and res2.summary["err_gptq_heldout_mean"] is None
    assert "no held-out split" in format_summary(res2.summary)
    assert not (res2.out / "heldout_gptq_vs_rtn.png").exists() and "err_gptq_heldout" not in json.loads(
        res2.manifest.read_text())["tensors"][0]
    assert load_file(str(res2.shard))["mtp.0.attn.wkv.weight"].dtype == torch.bfloat16
    assert {p for p, _, _ in seen} == {"rows", "tensors"} and sum(n for p, n, _ in seen if p == "tensors") == 24


def test_failure_while_assembling_leaves_nothing(env, tmp_path):
    """A base config that cannot take the MTP experts is refused (before the shard is written):
    the temp dir goes, ``out`` never appears."""
    base = env["base"]
    odd = tmp_path / "odd-base"
    odd.mkdir()
    for p in base.iterdir():
        if p.name != "config.json":
            (odd / p.name).symlink_to(p)
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "config_groups": {}, "ignore": ["re:.*experts.*"]}
    (odd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="ignore entry 're:.\\*experts.\\*' matches the MTP routed experts"):
        run_quantize(QuantizeJob(stores=[env["store"]], master=str(env["ckpt"]), base=str(odd),
                                 out=str(tmp_path / "o")), progress=False)
    _no_output(tmp_path, tmp_path / "o")


def test_act_order_run_declares_actorder_weight(env, tmp_path):
    """--act-order: the config group says actorder "weight" (groups stay on consecutive
    columns, no g_idx), vLLM's parser takes it, and the packed experts still decode."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from torch import nn
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig

    r = run_quantize(QuantizeJob(stores=[env["store"]], master=str(env["ckpt"]), base=str(env["base"]),
                                 out=str(tmp_path / "ao"), act_order=True), progress=False)
    qc = json.loads((r.out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_mtp_experts"]["weights"]["actorder"] == "weight"
    sd = CompressedTensorsConfig.from_config(qc).get_scheme_dict(nn.Linear(8, 8), "mtp.0.ffn.experts.1.w2")
    assert sd is not None and str(sd["weights"].actorder).lower().endswith("weight")
    m = json.loads(r.manifest.read_text())
    assert m["gptq"]["act_order"] is True and all(t["err_gptq"] < t["err_rtn"] for t in m["tensors"])
    shard = load_file(str(r.shard))
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=4, type="int", symmetric=True,
                                                                             strategy="group", group_size=128))
    t = {s: shard[f"mtp.0.ffn.experts.0.w1.{s}"] for s in ("weight_packed", "weight_scale", "weight_shape")}
    assert PackedQuantizationCompressor.decompress(t, scheme)["weight"].shape == (256, 512)


def test_offline_evaluation_of_the_quantised_dsv4_mtp(env, tmp_path):
    """``evaluate_offline`` on the stage's output: drafts from the decoded W4A16 experts against
    the master (the manifest's), both replay modes; the target's greedy choices recomputed from
    the stored pre-hc_head streams (target hc_head + norm + head) place every sequence's generated
    part exactly where the prompt ended; the master against itself has KL 0."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    from requant.quantizer.evaluate import OfflineConfig, evaluate_offline, load_mtp_for_eval

    out, ckpt, store = env["out"], env["ckpt"], env["store"]
    spec = load_block(ckpt, device="cpu").spec
    w = load_mtp_for_eval(out, spec, "cpu")   # packed experts decoded as compressed-tensors decodes them
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=4, type="int", symmetric=True,
                                                                             strategy="group", group_size=128))
    shard = load_file(str(out / SHARD))
    t = {s: shard[f"mtp.0.ffn.experts.3.w2.{s}"] for s in ("weight_packed", "weight_scale", "weight_shape")}
    assert torch.equal(w["ffn.experts.3.w2.weight"], PackedQuantizationCompressor.decompress(t, scheme)["weight"])

    res = evaluate_offline(OfflineConfig(checkpoint=str(out), stores=(store,), device="cpu"))
    assert res["against"] == str(ckpt) and res["in_sample"] is True and res["sequences"] == len(PROMPTS)
    assert res["generated_positions_from"] == {"prompt": 0, "inferred": len(PROMPTS)}
    for mode in ("identity", "full"):
        m = res["modes"][mode]
        # GEN generated tokens: GEN - 1 verifiable drafts per sequence — exactly, only if the
        # inferred start of every sequence's generated part is where its prompt ended
        assert m["positions"] == len(PROMPTS) * (GEN - 1)
        assert m["kl_to_master"] > 0 and 0 <= m["acceptance"] <= 1 and m["draft_agreement_with_master"] < 1
    assert res["modes"]["identity"]["ce"] != res["modes"]["full"]["ce"]

    own = evaluate_offline(OfflineConfig(checkpoint=str(ckpt), against=str(ckpt), stores=(store,), modes=("full",),
                                         device="cpu"))
    m = own["modes"]["full"]
    assert m["kl_to_master"] == pytest.approx(0, abs=1e-9) and m["draft_agreement_with_master"] == 1
    assert own["in_sample"] is False   # a master has no manifest: nothing says these rows calibrated it

"""The assembled DeepSeek-V4 checkpoint as vLLM's NVIDIA MTP sees it: for every module vLLM's
DeepSeekV4MTP creates (its own prefixes, from its tree built on the meta device), vLLM's
CompressedTensorsConfig read from our config.json gives the routed experts our W4A16 group,
the MTP attention the base's FP8 group when the base has one (else nothing), and e_proj,
h_proj, the shared expert, the gate and the shared head nothing; and vLLM's load_weights
puts every tensor of our shard on a parameter of that tree, leaving none unloaded but the
two the drafter shares with the target. Three bases: none; regex-target groups (W4A16 routed
experts + FP8_BLOCK attention, the rest BF16, as pasta-paul/DeepSeek-V4-Flash-W4A16-FP8); and
one group targeting ``Linear`` with an ignore list — and the last for DeepSeek-V3 too (vLLM's
DeepSeekMTP). Plus a base the MTP layer cannot be merged into, refused before anything is
written."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from requant.hooks.fixtures import make_dsv3, make_dsv4
from requant.quantizer.arch import load_spec
from requant.quantizer.assemble import AssembleConfig, read_base, write_assembly
from requant.quantizer.base_fixture import make_base
from requant.quantizer.pack import packed_tensors
from requant.quantizer.quant import QuantSpec, rtn

ATTN = ("wq_a", "wkv", "wq_b", "wo_a", "wo_b")
EXPERTS = r"re:.*ffn\.experts\.\d+\.(w1|w2|w3)$"


def _fp8_blocks(w: torch.Tensor, e8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 weight + one scale per 128×128 block (scale 1: the values fit E4M3 as they are)."""
    o, i = w.shape
    shape = (-(-o // 128), -(-i // 128))
    if e8m0:  # upstream DeepSeek: E8M0 byte 127 = 2**0
        return w.float().to(torch.float8_e4m3fn), torch.full(shape, 127, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    return w.float().to(torch.float8_e4m3fn), torch.ones(shape, dtype=torch.float32)


def _scheme(preset: str, targets: list[str], fmt: str) -> dict:
    from compressed_tensors.quantization import preset_name_to_scheme

    return {**preset_name_to_scheme(preset, targets).model_dump(exclude_none=True), "format": fmt}


def _assemble(master: Path, base: Path, out: Path) -> Path:
    """Our assembly of ``master``'s MTP into ``base`` (routed experts RTN-packed: this test is
    about names and schemes, not GPTQ)."""
    config, index = read_base(base)
    master_config = json.loads((master / "config.json").read_text())
    spec = load_spec(master_config)
    sd = load_file(str(master / "model.safetensors"))
    packed = {}
    for e in range(spec.n_experts):
        for p in ("w1", "w2", "w3"):
            name = spec.expert_name(e, p)
            q, scale = rtn(sd[name + ".weight"].float(), QuantSpec())
            packed.update(packed_tensors(name, q, scale, QuantSpec()))
    out.mkdir()
    write_assembly(out, base, config, index, spec, master, master_config, packed, AssembleConfig(), durable=False)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("match")
    master = make_dsv4(d / "dsv4", seed=0)
    # The FP8 master: the MTP attention in upstream DeepSeek-V4-Flash's format (E4M3 + E8M0 .scale).
    fp8_master = d / "dsv4-fp8"
    fp8_master.mkdir()
    for p in master.iterdir():
        if p.name != "model.safetensors":
            (fp8_master / p.name).write_bytes(p.read_bytes())
    sd = load_file(str(master / "model.safetensors"))
    for a in ATTN:
        sd[f"mtp.0.attn.{a}.weight"], sd[f"mtp.0.attn.{a}.scale"] = _fp8_blocks(sd[f"mtp.0.attn.{a}.weight"], True)
    save_file(sd, str(fp8_master / "model.safetensors"))
    # The regex base: its attention FP8_BLOCK in compressed-tensors' layout (.weight_scale); its
    # routed experts stay bf16 here — only the MTP layer is loaded in this test.
    regex_src = d / "regex-src"
    regex_src.mkdir()
    for p in fp8_master.iterdir():
        if p.name != "model.safetensors":
            (regex_src / p.name).write_bytes(p.read_bytes())
    base_sd = {k: v for k, v in sd.items() if not k.startswith("mtp.")}
    for k in [k for k in base_sd if k.startswith("layers.") and k.rsplit(".", 2)[-2] in ATTN and k.endswith(".weight")]:
        base_sd[k], base_sd[k[: -len(".weight")] + ".weight_scale"] = _fp8_blocks(base_sd[k], False)
    save_file(base_sd, str(regex_src / "model.safetensors"))
    regex_qc = {"quant_method": "compressed-tensors", "format": "mixed-precision", "quantization_status": "compressed",
                "config_groups": {"group_0": _scheme("W4A16", [EXPERTS], "pack-quantized"),
                                  "group_1": _scheme("FP8_BLOCK", [r"re:.*attn\.(wq_a|wkv|wq_b|wo_a|wo_b)$"],
                                                     "float-quantized")},
                "ignore": ["lm_head"]}
    linear_qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
                 "config_groups": {"group_0": _scheme("W4A16", ["Linear"], "pack-quantized")},
                 "ignore": ["lm_head", r"re:.*ffn\.gate$"]}
    dsv3 = make_dsv3(d / "dsv3", seed=0)
    bases = {"none": make_base(master, d / "base-none"),
             "regex": make_base(regex_src, d / "base-regex", quantization_config=regex_qc),
             "linear": make_base(master, d / "base-linear", quantization_config=linear_qc),
             "dsv3-linear": make_base(dsv3, d / "base-dsv3-linear", quantization_config=linear_qc)}
    masters = {"none": master, "regex": fp8_master, "linear": master, "dsv3-linear": dsv3}
    out = {k: _assemble(masters[k], b, d / f"out-{k}") for k, b in bases.items()}
    return {"out": out, "fp8_master": fp8_master, "d": d}


@pytest.fixture(scope="module")
def vllm_view(checkpoints):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(__file__).with_name("_vllm_mtp_match.py")
    run = subprocess.run([sys.executable, str(script), str(port)] + [str(p) for p in checkpoints["out"].values()],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(next(l for l in run.stdout.splitlines() if l.startswith("RESULT ")).removeprefix("RESULT "))
    return {k: res[p.name] for k, p in checkpoints["out"].items()}


W4A16 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "block": None, "symmetric": True}
FP8_BLOCK = {"num_bits": 8, "type": "float", "strategy": "block", "group_size": None, "block": [128, 128],
             "symmetric": True}
L = "model.layers.2."  # vLLM's prefix of the MTP layer: num_hidden_layers + 0


@pytest.mark.parametrize("base", ["none", "regex", "linear"])
def test_vllm_gives_each_mtp_module_the_intended_scheme(vllm_view, base):
    modules = vllm_view[base]["modules"]
    by_prefix = {m["prefix"]: m for m in modules.values()}
    attn = FP8_BLOCK if base == "regex" else None
    expected = {L + "ffn.experts": W4A16, L + "e_proj": None, L + "h_proj": None, L + "head": None,
                L + "attn.fused_wqa_wkv": attn, L + "attn.wq_b": attn, L + "attn.wo_a": attn, L + "attn.wo_b": attn,
                L + "ffn.shared_experts.gate_up_proj": None, L + "ffn.shared_experts.down_proj": None,
                L + "ffn.gate": None}
    assert set(expected) <= set(by_prefix), sorted(by_prefix)
    for prefix, m in by_prefix.items():
        if prefix == "model.embed_tokens":
            continue  # shared with the target
        assert prefix in expected, f"vLLM builds {prefix}, which this test does not know"
        assert m["weights"] == expected[prefix], (prefix, m)
        quantised = not m["method"].startswith("Unquantized")
        assert quantised == (expected[prefix] is not None), (prefix, m["method"])
    assert by_prefix[L + "ffn.experts"]["class"] == "RoutedExperts"


def test_dsv3_linear_base(vllm_view):
    """DeepSeek-V3's MTP keeps the checkpoint prefixes (model.layers.{n}.*, its shared head as
    .head): only the routed experts get a scheme; every shard tensor lands on a parameter."""
    view = vllm_view["dsv3-linear"]
    by_prefix = {m["prefix"]: m for m in view["modules"].values()}
    experts = "model.layers.2.mlp.experts"
    assert by_prefix[experts]["weights"] == W4A16 and by_prefix[experts]["method"] == "CompressedTensorsWNA16MoEMethod"
    others = {p: m for p, m in by_prefix.items() if p != experts}
    assert "model.layers.2.head" in others and "model.layers.2.self_attn.o_proj" in others
    assert all(m["weights"] is None and m["method"].startswith("Unquantized") for m in others.values()), others
    bad = {n: p for n, p in view["placed"].items() if not isinstance(p, list) or not p}
    assert not bad and len(view["placed"]) > 72, bad
    assert not [p for p in view["unloaded"] if ".experts." in p or ".self_attn." in p], view["unloaded"]


@pytest.mark.parametrize("base", ["none", "regex", "linear"])
def test_vllm_loader_places_every_shard_tensor(vllm_view, base):
    view = vllm_view[base]
    bad = {n: p for n, p in view["placed"].items() if not isinstance(p, list) or not p}
    assert not bad, bad
    # 8 experts × 3 × (packed, scale, shape) + the 29 other mtp.0.* tensors (+ 5 FP8 scales)
    assert len(view["placed"]) == 72 + 29 + (5 if base == "regex" else 0)
    # left unloaded: only what the drafter shares with the target (embedding, head)
    assert view["unloaded"] == ["model.embed_tokens.weight", "model.layers.2.shared_head.head.weight"]
    expert_params = {p for n, ps in view["placed"].items() if ".experts." in n for p in ps}
    assert {p.rsplit(".", 1)[1] for p in expert_params} == {"w13_weight_packed", "w13_weight_scale",
                                                           "w13_weight_shape", "w2_weight_packed",
                                                           "w2_weight_scale", "w2_weight_shape"}
    if base == "regex":  # FP8 attention with compressed-tensors' scale name, into the fused wq_a+wkv
        assert view["placed"]["mtp.0.attn.wq_a.weight_scale"] == [L + "mtp_block.attn.fused_wqa_wkv.weight_scale"]


def test_base_the_mtp_cannot_merge_into_is_refused_before_writing(checkpoints, tmp_path):
    """A base whose FP8 group serves the MTP's wq_a but not wkv: vLLM fuses the two into one
    layer, which cannot hold two schemes. Refused naming both; nothing is written."""
    d, master = checkpoints["d"], checkpoints["fp8_master"]
    cfg = json.loads((d / "base-regex" / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_1"]["targets"] = [r"re:.*attn\.(wq_a|wq_b|wo_a|wo_b)$"]
    odd = tmp_path / "odd-base"
    odd.mkdir()
    for p in (d / "base-regex").iterdir():
        if p.name != "config.json":
            (odd / p.name).symlink_to(p)
    (odd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"vLLM fuses the MTP modules mtp\.0\.attn\.wq_a and mtp\.0\.attn\.wkv"):
        _assemble(master, odd, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []

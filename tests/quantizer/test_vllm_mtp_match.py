"""The assembled DeepSeek-V4 checkpoint as vLLM's NVIDIA MTP sees it: for every module vLLM's
DeepSeekV4MTP creates (its own prefixes, from its tree built on the meta device), vLLM's
CompressedTensorsConfig read from our config.json gives the routed experts our W4A16 group,
the MTP attention the base's FP8 group when the base has one (else nothing), and e_proj,
h_proj, the shared expert, the gate and the shared head nothing; and vLLM's load_weights
puts every tensor of our shard on a parameter of that tree of the tensor's own dtype,
leaving none unloaded but the two the drafter shares with the target. The masters are FP8
as upstream (every non-expert linear E4M3 with block scales): what no base FP8 block group
serves is dequantised, equal to W = w · s. Three bases: none; regex-target groups (W4A16
routed experts + FP8_BLOCK attention, the rest BF16, as pasta-paul/DeepSeek-V4-Flash-W4A16-FP8);
and one group targeting ``Linear`` with an ignore list — and for DeepSeek-V3 (vLLM's
DeepSeekMTP) a Linear and a regex base. Plus a base the MTP layer cannot be merged into,
refused before anything is written."""
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from requant.quantizer.mtp.arch import load_spec
from requant.quantizer.stage.assemble import AssembleConfig, write_assembly
from requant.quantizer.stage.base_files import read_base
from requant.testing.base import make_base
from requant.quantizer.core.pack import packed_tensors
from requant.quantizer.core.quant import QuantSpec, rtn

ATTN = ("wq_a", "wkv", "wq_b", "wo_a", "wo_b")
EXPERTS = r"re:.*ffn\.experts\.\d+\.(w1|w2|w3)$"
# The MTP linears FP8 in the upstream masters (DSV4-Flash; DeepSeek-V3/R1): everything but the
# routed experts, the gate and the shared head.
FP8_DSV4 = ["e_proj", "h_proj"] + [f"attn.{a}" for a in ATTN] + [f"ffn.shared_experts.w{i}" for i in (1, 2, 3)]
DSV3_ATTN = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
FP8_DSV3 = ["eh_proj"] + [f"self_attn.{a}" for a in DSV3_ATTN] + [f"mlp.shared_experts.{p}_proj"
                                                                  for p in ("gate", "up", "down")]


def _fp8_blocks(w: torch.Tensor, e8m0: bool, g: torch.Generator | None = None):
    """E4M3 weight + one scale per 128×128 block, and what they dequantise to (W = w · s per
    block, computed here on its own). Scales 2^k, k random in [-3, 3] with ``g``, else 1."""
    o, i = w.shape
    shape = (-(-o // 128), -(-i // 128))
    k = torch.randint(-3, 4, shape, generator=g) if g is not None else torch.zeros(shape, dtype=torch.long)
    full = torch.exp2(k.double()).kron(torch.ones(128, 128, dtype=torch.double))[:o, :i]
    w8 = (w.double() / full).to(torch.float8_e4m3fn)
    ref = (w8.double() * full).to(torch.bfloat16)
    if e8m0:  # upstream DeepSeek-V4: E8M0 bytes, 127 = 2**0
        return w8, (k + 127).to(torch.uint8).view(torch.float8_e8m0fnu), ref
    return w8, torch.exp2(k.float()), ref  # DeepSeek-V3/R1 and compressed-tensors: float32


def _copy_side_files(src: Path, dst: Path) -> None:
    dst.mkdir()
    for p in src.iterdir():
        if p.name != "model.safetensors":
            (dst / p.name).write_bytes(p.read_bytes())


def _fp8_master(src: Path, dst: Path, modules: list[str], prefix: str, scale: str, e8m0: bool, seed: int):
    """``src`` with its MTP ``modules`` FP8 as the upstream master stores them. Returns
    (master, {module: its dequantised weight})."""
    _copy_side_files(src, dst)
    sd = load_file(str(src / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    ref = {}
    for m in modules:
        m = prefix + m
        sd[m + ".weight"], sd[m + scale], ref[m] = _fp8_blocks(sd[m + ".weight"], e8m0, g)
    save_file(sd, str(dst / "model.safetensors"))
    return dst, ref


def _fp8_base(master: Path, dst: Path, pattern: str, qc: dict) -> Path:
    """A base whose attention linears matching ``pattern`` are FP8_BLOCK in compressed-tensors'
    layout (.weight_scale); its routed experts stay bf16 here — only the MTP layer is loaded."""
    src = dst.with_name(dst.name + "-src")
    _copy_side_files(master, src)
    spec = load_spec(json.loads((master / "config.json").read_text()))
    sd = {k: v for k, v in load_file(str(master / "model.safetensors")).items() if not k.startswith(spec.prefix)}
    for k in [k for k in sd if re.match(pattern, k.removesuffix(".weight")) and k.endswith(".weight")]:
        sd[k], sd[k.removesuffix(".weight") + ".weight_scale"], _ = _fp8_blocks(sd[k], False)
    save_file(sd, str(src / "model.safetensors"))
    return make_base(src, dst, quantization_config=qc)


def _scheme(preset: str, targets: list[str], fmt: str) -> dict:
    from compressed_tensors.quantization import preset_name_to_scheme

    return {**preset_name_to_scheme(preset, targets).model_dump(exclude_none=True), "format": fmt}


def _assemble(master: Path, base: Path, out: Path) -> dict:
    """Our assembly of ``master``'s MTP into ``base`` (routed experts RTN-packed: this test is
    about names, schemes and dtypes, not GPTQ). Returns the assembly's manifest facts."""
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
    return write_assembly(out, base, config, index, spec, master, master_config, packed, AssembleConfig(),
                          durable=False)


def _qc(groups: dict, ignore: list[str], fmt: str = "mixed-precision") -> dict:
    return {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
            "config_groups": groups, "ignore": ignore}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_dsv4, tiny_dsv3, tiny_dsv4_base):
    """FP8 masters (DSV4: E8M0 ``.scale``; DSV3: float32 ``.weight_scale_inv``, as upstream)
    assembled into the bases: none; regex groups with FP8_BLOCK attention (the MTP attention
    stays FP8, e_proj/h_proj/the shared expert are dequantised); a W4A16 group targeting
    ``Linear`` (every FP8 linear dequantised); and DSV3 with a Linear and a regex base."""
    d = tmp_path_factory.mktemp("match")
    bf16 = tiny_dsv4
    master, ref = _fp8_master(bf16, d / "dsv4-fp8", FP8_DSV4, "mtp.0.", ".scale", True, seed=5)
    dsv3, ref3 = _fp8_master(tiny_dsv3, d / "dsv3-fp8", FP8_DSV3, "model.layers.2.",
                             ".weight_scale_inv", False, seed=6)
    attn4, attn3 = rf"^layers\.\d+\.attn\.({'|'.join(ATTN)})$", rf"^model\.layers\.\d+\.self_attn\.({'|'.join(DSV3_ATTN)})$"
    regex_qc = _qc({"group_0": _scheme("W4A16", [EXPERTS], "pack-quantized"),
                    "group_1": _scheme("FP8_BLOCK", [r"re:.*attn\.(wq_a|wkv|wq_b|wo_a|wo_b)$"], "float-quantized")},
                   ["lm_head"])
    # its FP8 group names eh_proj too, which vLLM builds as a plain nn.Linear: dequantised all the same
    regex3_qc = _qc({"group_0": _scheme("W4A16", [r"re:.*mlp\.experts\.\d+\.(gate|up|down)_proj$"], "pack-quantized"),
                     "group_1": _scheme("FP8_BLOCK", [rf"re:.*(self_attn\.({'|'.join(DSV3_ATTN)})|eh_proj)$"],
                                        "float-quantized")}, ["lm_head"])
    linear_qc = _qc({"group_0": _scheme("W4A16", ["Linear"], "pack-quantized")}, ["lm_head", r"re:.*ffn\.gate$"],
                    "pack-quantized")
    bases = {"none": (master, tiny_dsv4_base),
             "regex": (master, _fp8_base(master, d / "base-regex", attn4, regex_qc)),
             "linear": (master, make_base(bf16, d / "base-linear", quantization_config=linear_qc)),
             "dsv3-linear": (dsv3, make_base(dsv3, d / "base-dsv3-linear", quantization_config=linear_qc)),
             "dsv3-regex": (dsv3, _fp8_base(dsv3, d / "base-dsv3-regex", attn3, regex3_qc))}
    facts = {k: _assemble(m, b, d / f"out-{k}") for k, (m, b) in bases.items()}
    return {"out": {k: d / f"out-{k}" for k in bases}, "facts": facts, "masters": {k: m for k, (m, _) in bases.items()},
            "ref": {**ref, **ref3}, "fp8_master": master, "d": d}


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


@pytest.mark.parametrize("base", ["dsv3-linear", "dsv3-regex"])
def test_dsv3_bases(vllm_view, base):
    """DeepSeek-V3's MTP keeps the checkpoint prefixes (model.layers.{n}.*, its shared head as
    .head): the routed experts get the W4A16 group, the attention the base's FP8_BLOCK group
    where it has one (fused q_a + kv_a included), all else nothing; every shard tensor lands
    on a parameter."""
    view = vllm_view[base]
    by_prefix = {m["prefix"]: m for m in view["modules"].values()}
    experts = L + "mlp.experts"
    assert by_prefix[experts]["weights"] == W4A16 and by_prefix[experts]["method"] == "CompressedTensorsWNA16MoEMethod"
    fp8 = {L + "self_attn." + a for a in ("fused_qkv_a_proj", "q_b_proj", "kv_b_proj", "o_proj")}
    assert fp8 <= set(by_prefix) and L + "head" in by_prefix, sorted(by_prefix)  # eh_proj: a plain nn.Linear
    for prefix, m in by_prefix.items():
        if prefix != experts:
            want = FP8_BLOCK if base == "dsv3-regex" and prefix in fp8 else None
            assert m["weights"] == want and m["method"].startswith("Unquantized") == (want is None), (prefix, m)
    bad = {n: p for n, p in view["placed"].items() if not isinstance(p, list) or not p}
    assert not bad and len(view["placed"]) > 72, bad
    assert not [p for p in view["unloaded"] if ".experts." in p or ".self_attn." in p], view["unloaded"]


# Loaded with a cast vLLM itself chose: compressed-tensors' int64 .weight_shape into the
# parameter vLLM's W4A16 MoE builds in the model dtype, and the tiny DSV3 fixture's BF16 gate
# bias into vLLM's float32 one (upstream stores it float32).
_CAST_BY_VLLM = (".weight_shape", ".e_score_correction_bias")
_ST = {"BF16": torch.bfloat16, "F32": torch.float32, "F8_E4M3": torch.float8_e4m3fn, "I32": torch.int32,
       "I64": torch.int64, "F8_E8M0": torch.float8_e8m0fnu}


@pytest.mark.parametrize("base", ["none", "regex", "linear", "dsv3-linear", "dsv3-regex"])
def test_fp8_master_tensors_load_in_the_parameters_dtype(checkpoints, vllm_view, base):
    """An FP8 master: every tensor vLLM loads has the dtype of the parameter vLLM built for it
    (its meta tree); the FP8 linears no base FP8 block group serves are BF16 equal to the
    dequantised master (W = w · s per block) without a scale, the served ones the master's
    bytes with a float32 scale of the same values; the manifest names both sets."""
    view, facts = vllm_view[base], checkpoints["facts"][base]
    wrong = {n: d for n, d in view["dtypes"].items()
             if not n.endswith(_CAST_BY_VLLM) and any(p != str(_ST[d[0]]) for p in d[1:])}
    assert not wrong and len(view["dtypes"]) == len(view["placed"]), wrong
    dsv4 = not base.startswith("dsv3")
    prefix, modules = ("mtp.0.", FP8_DSV4) if dsv4 else (L, FP8_DSV3)
    fp8 = [prefix + m for m in modules]
    served = {m for m in fp8 if base.endswith("regex") and ".attn." in m.replace("self_attn", "attn")}
    assert sorted(facts["fp8_modules"]) == sorted(served)
    assert sorted(facts["fp8_dequantised"]) == sorted(set(fp8) - served)
    shard = load_file(str(next(checkpoints["out"][base].glob("model-mtp-*.safetensors"))))
    master = load_file(str(checkpoints["masters"][base] / "model.safetensors"))
    for m in fp8:
        scales = [n for n in shard if n.startswith(m + ".") and n != m + ".weight"]
        if m in served:
            assert torch.equal(shard[m + ".weight"].view(torch.uint8), master[m + ".weight"].view(torch.uint8)), m
            raw = master[m + (".scale" if dsv4 else ".weight_scale_inv")]
            want = torch.exp2(raw.view(torch.uint8).float() - 127) if dsv4 else raw
            assert scales == [m + ".weight_scale"] and torch.equal(shard[m + ".weight_scale"], want), m
        else:
            assert not scales and shard[m + ".weight"].dtype == torch.bfloat16, (m, scales)
            assert torch.equal(shard[m + ".weight"], checkpoints["ref"][m]), m


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

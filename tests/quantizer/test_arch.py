"""MTP architecture adapters (quantizer/mtp/arch.py): specs from both tiny fixtures' configs, names
that exist in the checkpoints, the block built for each, and clear refusals."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from requant.hooks.fixtures import dsv3_config, dsv4_config
from requant.quantizer.mtp.arch import MTPSpec, load_block, load_spec


@pytest.fixture(scope="module")
def dsv4(tiny_dsv4):
    return tiny_dsv4


@pytest.fixture(scope="module")
def dsv3(tiny_dsv3):
    return tiny_dsv3


def _names(ckpt):
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_specs_of_both_fixtures():
    assert load_spec(dsv4_config(300)) == MTPSpec("dsv4", "mtp.0.", 512, 4, 8, 2, 256, 10.0)
    assert load_spec(dsv3_config(300)) == MTPSpec("dsv3", "model.layers.2.", 256, 1, 8, 2, 128, None)


def test_names_exist_in_the_checkpoints(dsv4, dsv3):
    for ckpt in (dsv4, dsv3):
        spec = load_spec(json.loads((ckpt / "config.json").read_text()))
        names = _names(ckpt)
        for e in range(spec.n_experts):
            for p in ("w1", "w2", "w3"):
                assert spec.expert_name(e, p) + ".weight" in names
        kept = [n for n in spec.non_expert_prefixes() if n + ".weight" in names]
        assert not any(".experts." in n for n in spec.non_expert_prefixes())
        if spec.arch == "dsv4":
            assert len(kept) == len(spec.non_expert_prefixes())   # every DSV4 name is real
        else:                                                     # q_proj only without q-LoRA
            assert set(spec.non_expert_prefixes()) - set(kept) == {spec.prefix + "self_attn.q_proj"}
    spec = load_spec(dsv3_config(300))
    assert spec.expert_name(5, "w1") == "model.layers.2.mlp.experts.5.gate_proj"
    assert spec.expert_name(5, "w3") == "model.layers.2.mlp.experts.5.up_proj"
    assert spec.expert_name(5, "w2") == "model.layers.2.mlp.experts.5.down_proj"
    with pytest.raises(ValueError, match="w1, w2 or w3"):
        spec.expert_name(0, "gate")
    with pytest.raises(ValueError, match=r"expert 8 outside \[0, 8\)"):
        spec.expert_name(8, "w1")


def test_blocks_for_both_fixtures(dsv4, dsv3):
    b4 = load_block(dsv4, device="cpu")
    assert b4.spec.arch == "dsv4" and type(b4).__name__ == "DSV4Block"
    assert torch.equal(b4.embed, load_file(str(dsv4 / "model.safetensors"))["embed.weight"])  # target's embedding
    w1, w2, w3 = b4.expert_weights()
    assert w1.shape == (8, 256, 512) and w2.shape == (8, 512, 256) and w3.shape == (8, 256, 512)
    assert w1.dtype == torch.bfloat16 and w1.device.type == "cpu"
    sd = load_file(str(dsv4 / "model.safetensors"))
    assert torch.equal(w2[3], sd["mtp.0.ffn.experts.3.w2.weight"])
    b3 = load_block(dsv3, device="cpu")
    assert b3.spec.arch == "dsv3" and b3.spec.hc_mult == 1
    w1, w2, w3 = b3.expert_weights()
    assert w1.shape == (8, 128, 256) and w2.shape == (8, 256, 128)


def test_refusals(dsv4, tmp_path):
    with pytest.raises(ValueError, match="no MTP layer"):
        load_spec({**dsv4_config(300), "num_nextn_predict_layers": 0})
    with pytest.raises(ValueError, match="DSpark"):
        load_spec({**dsv4_config(300), "dspark_num_stages": 3})
    with pytest.raises(ValueError, match="unsupported architecture.*llama"):
        load_spec({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_nextn_predict_layers": 1})
    with pytest.raises(ValueError, match="lacks 'n_routed_experts'"):
        load_spec({k: v for k, v in dsv4_config(300).items() if k != "n_routed_experts"})
    # an MTP-only shard: no embedding unless embed_from points at the target
    sd = load_file(str(dsv4 / "model.safetensors"))
    mtp_only = tmp_path / "mtp"
    mtp_only.mkdir()
    save_file({k: v for k, v in sd.items() if k.startswith("mtp.")}, str(mtp_only / "model.safetensors"))
    (mtp_only / "config.json").write_text((dsv4 / "config.json").read_text())
    with pytest.raises(ValueError, match=r"mtp: no embedding \(embed.weight.*pass embed_from="):
        load_block(mtp_only, device="cpu")
    assert torch.equal(load_block(mtp_only, device="cpu", embed_from=dsv4).embed, sd["embed.weight"])
    # a missing MTP tensor is named
    broken = tmp_path / "broken"
    broken.mkdir()
    save_file({k: v for k, v in sd.items() if k != "mtp.0.attn.wkv.weight"}, str(broken / "model.safetensors"))
    (broken / "config.json").write_text((dsv4 / "config.json").read_text())
    with pytest.raises(ValueError, match=r"missing mtp\.0\.attn\.wkv\.weight"):
        load_block(broken, device="cpu")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_block(tmp_path / "nowhere", device="cpu")

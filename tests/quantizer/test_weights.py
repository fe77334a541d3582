"""MTP master-weight loading: BF16, FP8 block scales under every naming, MXFP4 experts,
DSpark refusal, missing pieces — against independent formulas, plus both tiny fixtures."""
import json

import pytest
import torch
from safetensors.torch import save_file

from requant.quantizer.mtp.arch import checkpoint_config, load_spec
from requant.quantizer.mtp.weights import dequant_mxfp4, e8m0_to_float, load_mtp_weights

LUT = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _ckpt(tmp_path, tensors, config=None):
    save_file(tensors, str(tmp_path / "model-00001-of-00001.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config or {"model_type": "deepseek_v4", "hc_mult": 4}))
    return tmp_path


@pytest.mark.parametrize("suffix", [".scale", ".weight_scale_inv", ".weight_scale"])
@pytest.mark.parametrize("scale_dtype", ["e8m0", "uint8", "f32"])
def test_fp8_block_dequant_under_every_scale_naming(tmp_path, suffix, scale_dtype):
    g = torch.Generator().manual_seed(0)
    w8 = (torch.randn(200, 300, generator=g) * 2).to(torch.float8_e4m3fn)
    exps = torch.randint(120, 130, (2, 3), generator=g, dtype=torch.uint8)
    scale = {"e8m0": exps.view(torch.float8_e8m0fnu), "uint8": exps, "f32": torch.exp2(exps.float() - 127)}[scale_dtype]
    d = _ckpt(tmp_path, {"mtp.0.attn.wq_a.weight": w8, f"mtp.0.attn.wq_a{suffix}": scale,
                         "mtp.0.enorm.weight": torch.ones(4, dtype=torch.bfloat16)})
    out = load_mtp_weights(d, "mtp.0.")
    assert set(out) == {"attn.wq_a.weight", "enorm.weight"}
    for i, j in [(0, 0), (199, 299), (130, 140), (5, 260)]:
        expect = float(w8[i, j].float()) * 2.0 ** (int(exps[i // 128, j // 128]) - 127)
        assert out["attn.wq_a.weight"][i, j].item() == pytest.approx(expect, rel=1e-2)
    assert out["attn.wq_a.weight"].dtype == torch.bfloat16


def test_mxfp4_low_nibble_is_the_even_column(tmp_path):
    codes = torch.tensor([[3, 9, 7, 0] * 8])          # 32 inputs: 1.5, -0.5, 6, 0, ...
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    scale = torch.tensor([[128]], dtype=torch.uint8)   # 2^1
    w = dequant_mxfp4(packed, scale)
    expect = [(LUT[c & 7] * (-1 if c & 8 else 1)) * 2 for c in codes[0].tolist()]
    assert w[0].float().tolist() == expect
    d = _ckpt(tmp_path, {"mtp.0.ffn.experts.0.w1.weight": packed, "mtp.0.ffn.experts.0.w1.scale": scale})
    assert torch.equal(load_mtp_weights(d, "mtp.0.")["ffn.experts.0.w1.weight"], w)


def test_dspark_and_missing_pieces_are_refused(tmp_path):
    d = _ckpt(tmp_path, {"mtp.0.main_proj.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="DSpark"):
        load_mtp_weights(d, "mtp.0.")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v4", "dspark_num_stages": 3}))
    with pytest.raises(ValueError, match="DSpark"):
        load_spec(checkpoint_config(d))
    e = tmp_path / "e"
    e.mkdir()
    _ckpt(e, {"layers.0.attn.wq_a.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="no tensors under 'mtp.0.'"):
        load_mtp_weights(e, "mtp.0.")
    f = tmp_path / "f"
    f.mkdir()
    _ckpt(f, {"mtp.0.attn.wkv.weight": torch.zeros(128, 128).to(torch.float8_e4m3fn)})
    with pytest.raises(ValueError, match="has no scale"):
        load_mtp_weights(f, "mtp.0.")


def test_both_tiny_fixtures(tiny_dsv4, tiny_dsv3):
    v4 = load_mtp_weights(tiny_dsv4, "mtp.0.")
    assert v4["ffn.experts.7.w2.weight"].shape == (512, 256) and "hc_head_fn" in v4
    v3 = load_mtp_weights(tiny_dsv3, "model.layers.2.")
    assert "eh_proj.weight" in v3 and v3["mlp.experts.0.gate_proj.weight"].shape == (128, 256)


def test_e8m0_is_every_power_of_two_exactly():
    b = torch.arange(255, dtype=torch.uint8)
    want = [2.0 ** (i - 127) for i in range(255)]
    assert e8m0_to_float(b).double().tolist() == want
    assert e8m0_to_float(b.view(torch.float8_e8m0fnu)).double().tolist() == want
    with pytest.raises(ValueError, match="0xFF"):
        e8m0_to_float(torch.tensor([255], dtype=torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the GPU machine)")
def test_dequantised_on_the_gpu_equals_the_cpu_bit_for_bit(tmp_path):
    g = torch.Generator().manual_seed(1)
    w8 = (torch.randn(256, 384, generator=g) * 3).to(torch.float8_e4m3fn)
    packed = torch.randint(-128, 128, (256, 192), generator=g, dtype=torch.int8)
    d = _ckpt(tmp_path, {"mtp.0.attn.wq_a.weight": w8,
                         "mtp.0.attn.wq_a.scale": torch.randint(0, 255, (2, 3), generator=g, dtype=torch.uint8),
                         "mtp.0.ffn.experts.0.w1.weight": packed,
                         "mtp.0.ffn.experts.0.w1.scale": torch.randint(100, 140, (256, 12), generator=g,
                                                                         dtype=torch.uint8).view(torch.float8_e8m0fnu),
                         "mtp.0.enorm.weight": torch.randn(4, generator=g).bfloat16()})
    cpu, gpu = load_mtp_weights(d, "mtp.0."), load_mtp_weights(d, "mtp.0.", device="cuda")
    assert set(cpu) == set(gpu)
    for k in cpu:
        assert gpu[k].is_cuda
        assert torch.equal(cpu[k].view(torch.int16), gpu[k].cpu().view(torch.int16)), k

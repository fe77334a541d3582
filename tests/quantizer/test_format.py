"""Packing and scales against compressed-tensors (the format oracle vLLM loads)."""
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize

from requant.quantizer.core.pack import pack_int32, packed_tensors, unpack_int32, w4a16_config_group
from requant.quantizer.core.quant import QuantSpec, dequantize, group_scales, rtn

SPEC = QuantSpec()
ARGS = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=128)
SCHEME = QuantizationScheme(targets=["Linear"], weights=ARGS)


@pytest.mark.parametrize("shape", [(8, 128), (64, 256), (24, 1024), (2048 // 16, 4096 // 8)])
def test_pack_is_byte_identical_to_compressed_tensors(shape):
    g = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    q = torch.randint(-8, 8, shape, generator=g, dtype=torch.int8)
    scale = (torch.rand(shape[0], shape[1] // 128, generator=g) * 0.01 + 1e-4).bfloat16()
    # What a GPTQ'd checkpoint stores: fake-quantised weights + scales; the compressor
    # re-derives the integers and packs them.
    weight = (q.float() * scale.float().repeat_interleave(128, 1)).bfloat16()
    ref = PackedQuantizationCompressor.compress({"weight": weight, "weight_scale": scale}, SCHEME)
    ours = packed_tensors("layer", q, scale.float(), SPEC)
    assert set(ref) == {"weight_packed", "weight_scale", "weight_shape"}
    for key in ref:
        a, b = ours[f"layer.{key}"], ref[key]
        assert a.dtype == b.dtype and a.shape == b.shape, key
        assert torch.equal(a.contiguous().flatten().view(torch.uint8), b.contiguous().flatten().view(torch.uint8)), key
    back = PackedQuantizationCompressor.decompress(ref, SCHEME)["weight"]
    assert torch.equal(back, dequantize(q, scale, SPEC).to(back.dtype))  # q·s rounded to the model dtype


def test_unpack_inverts_pack_and_known_words():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)
    assert torch.equal(unpack_int32(pack_int32(q)), q)
    assert pack_int32(torch.arange(-8, 0, dtype=torch.int8)[None]).item() == 0x76543210
    assert pack_int32(torch.zeros(1, 8, dtype=torch.int8)).item() == 0x88888888 - 2**32


def test_rtn_matches_compressed_tensors_quantize():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 512, generator=g) * 0.05
    w[:, :128] = 0  # an all-zero group: scale becomes the dtype's eps
    q, s = rtn(w, SPEC)
    assert s[0, 0].item() == torch.finfo(torch.bfloat16).eps
    ct = ct_quantize(w, s, torch.zeros_like(s), ARGS, dtype=torch.int8)
    assert torch.equal(q, ct)
    assert q.min() >= -8 and q.max() <= 7


def test_scale_is_absmax_over_7_5_in_bf16():
    w = torch.tensor([[1.5] + [0.0] * 127, [-3.0] + [0.1] * 127])
    s = group_scales(w, SPEC)
    assert s[:, 0].tolist() == [torch.tensor(1.5 / 7.5).bfloat16().item(), torch.tensor(3.0 / 7.5).bfloat16().item()]


def test_config_group_parses_as_compressed_tensors_config():
    cfg = {"quant_method": "compressed-tensors", "format": "pack-quantized",
           "quantization_status": "compressed",
           "config_groups": {"group_0": w4a16_config_group([r"re:.*experts\.\d+\.(w1|w2|w3)$"], SPEC)},
           "ignore": ["lm_head"]}
    parsed = QuantizationConfig.model_validate(cfg)
    w = parsed.config_groups["group_0"].weights
    assert (w.num_bits, w.group_size, w.symmetric, w.strategy) == (4, 128, True, "group")


def test_packed_tensors_rejects_mismatched_scale():
    with pytest.raises(ValueError, match="scale shape"):
        packed_tensors("x", torch.zeros(4, 256, dtype=torch.int8), torch.ones(4, 3), SPEC)

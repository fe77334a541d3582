"""Capture points are declared data; using one on a model it does not fit fails at start-up
with a message naming the point, the module path and what is there instead."""
import pytest
import torch

from requant.hooks.attach import attach
from requant.hooks.points import POINTS, CapturePointError, find_point, resolve


def _tiny_hf_dsv3():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    cfg = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                           num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
                           n_group=1, topk_group=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16,
                           kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    return DeepseekV3ForCausalLM(cfg).eval()


def test_every_declared_point_is_unique_and_complete():
    # at most one point per (name, engine, arch, model tree)
    keys = [(p.name, p.engine, p.arch, w) for p in POINTS for w in p.where]
    assert len(keys) == len(set(keys))
    assert {(p.name, p.engine) for p in POINTS} >= {("target_pre_head", "vllm"), ("mtp_input", "vllm"),
                                                    ("target_pre_head", "hf")}
    # DSV4: per vLLM platform tree, picked by the module of the model class built
    nv = find_point("target_pre_head", "vllm", "DeepseekV4ForCausalLM", "vllm.models.deepseek_v4.nvidia.model")
    assert [(r.io, r.module, r.name) for r in nv.hidden] == [
        ("buffer", "model", "_mtp_hidden_buffer"), ("call", "model", "hc_head_fused_kernel_tilelang")]
    assert nv.hidden[1].bound == (1, "hc_head_fn") and nv.hc_mult_key == "hc_mult"
    for tree in ("cpu", "amd", "xpu"):
        p = find_point("target_pre_head", "vllm", "DeepseekV4ForCausalLM", f"vllm.models.deepseek_v4.{tree}.model")
        assert (p.hidden[1].module, p.hidden[1].cls, p.hidden[1].io) == ("model.hc_head_op", "HCHeadOp", "input")
    mtp4 = find_point("mtp_input", "vllm", "DeepseekV4ForCausalLM", "vllm.models.deepseek_v4.nvidia.mtp")
    assert (mtp4.hidden[0].cls, mtp4.hidden[0].kwarg, mtp4.ids_offset) == (
        "DeepSeekV4MultiTokenPredictorLayer", "previous_hidden_states", 1)
    assert find_point("mtp_input", "vllm", "DeepseekV3ForCausalLM").ids_offset == 1


def test_unknown_architecture_or_point():
    with pytest.raises(CapturePointError, match="no capture points are declared for architecture 'LlamaForCausalLM'"):
        find_point("target_pre_head", "vllm", "LlamaForCausalLM")
    with pytest.raises(CapturePointError, match="'mtp_input' is not declared for DeepseekV4ForCausalLM"):
        find_point("mtp_input", "hf", "DeepseekV4ForCausalLM")
    with pytest.raises(CapturePointError, match=r"declared for the model trees vllm\.models\.deepseek_v4\.nvidia\.\*.*"
                                                 r"comes from 'vllm\.models\.deepseek_v4\.cpu\.mtp', which matches none"):
        find_point("mtp_input", "vllm", "DeepseekV4ForCausalLM", "vllm.models.deepseek_v4.cpu.mtp")


def test_point_that_matches_no_module_names_what_is_there():
    model = _tiny_hf_dsv3()
    v4 = find_point("target_pre_head", "hf", "DeepseekV4ForCausalLM")
    with pytest.raises(CapturePointError, match=r"no module 'model.hc_head' of class DeepseekV4HyperHead in "
                                                 r"DeepseekV3ForCausalLM"):
        resolve(v4.hidden[0], model, "hidden")
    v3 = find_point("target_pre_head", "hf", "DeepseekV3ForCausalLM")
    wrong = type(v3.hidden[0])("model.norm", "DeepseekV4RMSNorm", "output")
    with pytest.raises(CapturePointError, match=r"at that path: model.norm \(DeepseekV3RMSNorm\)"):
        resolve(wrong, model, "hidden")


def test_hf_dsv3_point_captures_the_final_hidden_states():
    model = _tiny_hf_dsv3()
    point = find_point("target_pre_head", "hf", "DeepseekV3ForCausalLM")
    got = []
    hooks = attach(point, model, lambda h, ids, pos: got.append((h.clone(), ids.clone())), width=32)
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    hooks.remove()
    with torch.no_grad():
        model(ids)  # removed: no more rows
    assert len(got) == 1 and torch.equal(got[0][1], ids[0])
    assert torch.equal(got[0][0], out.hidden_states[-1][0])

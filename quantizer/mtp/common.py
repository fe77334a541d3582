"""What the DeepSeek-V3 and -V4 MTP blocks share: the block's constructor shape and the methods
that do not depend on the architecture (``MTPBlock``), and the equations both forwards use —
RMSNorm, interleaved (GPT-J) RoPE, the checks of ``moe_inputs``' rows and whole sequences, the
gate's scores and its top-k tail. Precision as vLLM's bf16 path: fp32 math, cast back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("identity", "full")


# -- equations ---------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm in fp32 (weight applied in fp32 too, as vLLM's kernels do; ``None``: no weight),
    cast back to x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if w is not None:
        y = y * w.float()
    return y.to(x.dtype)


def rope_inv_freq(theta: float, dim: int, device: str | torch.device | None = None) -> torch.Tensor:
    """[dim/2] fp32 inverse frequencies θ^(−2i/dim) of plain RoPE."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)


def rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (0,1), (2,3), … of x [T, ..., rd] by per-row angles (cos/sin [T, rd/2]), fp32 math."""
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
    cos, sin = cos.view(shape), sin.view(shape)
    xf = x.float()
    a, b = xf[..., 0::2], xf[..., 1::2]
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2).to(x.dtype)


def sqrtsoftplus(logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(logits).sqrt()


def gate_scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """The gate's scores of fp32 logits: ``sqrtsoftplus``, ``sigmoid`` or ``softmax``."""
    if scoring == "sqrtsoftplus":
        return sqrtsoftplus(logits)
    if scoring == "sigmoid":
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=-1)


def topk_routing(choice: torch.Tensor, scores: torch.Tensor, topk: int, normalise: bool,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ids [T, k] = top-k of ``choice`` (the scores, biased or masked: selection only) and
    their weights [T, k] = ``scores`` there, divided by their sum if ``normalise``, × ``scale``."""
    ids = choice.topk(topk, dim=-1).indices
    weights = scores.gather(1, ids)
    if normalise:
        weights = weights / weights.sum(-1, keepdim=True)
    return ids, weights * scale


# -- checks ------------------------------------------------------------------------------------

def check_rows(hidden: torch.Tensor, next_token: torch.Tensor, position: torch.Tensor, mode: str,
               width: int, shown: str) -> None:
    """``moe_inputs``' arguments: hidden [T, width] (``shown``: how the width reads in the error),
    next_token and position [T], a known mode."""
    T = hidden.shape[0]
    if hidden.shape != (T, width):
        raise ValueError(f"hidden rows must be [T, {shown}], got {tuple(hidden.shape)}")
    if next_token.shape != (T,) or position.shape != (T,):
        raise ValueError(f"next_token/position must be [{T}], got {tuple(next_token.shape)}/{tuple(position.shape)}")
    if mode not in MODES:
        raise ValueError(f"replay mode must be 'identity' or 'full', got {mode!r}")


def sequence_starts(seq_lens: list[int] | None, pos: torch.Tensor) -> list[int]:
    """Row offsets [0, …, T] of the sequences ``seq_lens`` that must cover the rows, each in
    consecutive position order (attention needs every earlier row)."""
    T = pos.shape[0]
    if seq_lens is None:
        raise ValueError("full replay needs seq_lens (rows are whole sequences concatenated)")
    if sum(seq_lens) != T or any(n <= 0 for n in seq_lens):
        raise ValueError(f"seq_lens {list(seq_lens)[:8]}… (sum {sum(seq_lens)}) do not cover {T} rows")
    if T > 1:
        seq = torch.repeat_interleave(torch.arange(len(seq_lens), device=pos.device),
                                      torch.tensor(list(seq_lens), device=pos.device))
        bad = (seq[1:] == seq[:-1]) & (pos[1:] - pos[:-1] != 1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"full replay: positions not consecutive within sequence {int(seq[i])} "
                             f"({int(pos[i])} then {int(pos[i + 1])}); attention would miss rows")
    starts = [0]
    for n in seq_lens:
        starts.append(starts[-1] + n)
    return starts


# -- the block ---------------------------------------------------------------------------------

class MTPBlock:
    """One MTP layer, run up to its routed experts' inputs (``moe_inputs``, for GPTQ Hessians) or
    to its head (``head_input``, for drafts). Every block is built as
    ``Block(spec, dims, weights, embed=None, device=None, dtype=torch.bfloat16)`` — ``spec`` the
    ``arch.MTPSpec``, ``dims`` the architecture's config values, ``weights`` the layer's tensors
    relative to its prefix, dequantised (``weights.load_mtp_weights``), ``embed`` the embedding
    next tokens are looked up in — or from a config.json's contents with ``Block.from_config``.
    Routed experts are stacked in bf16 where the weights are (``load_block`` puts them on the
    block's device); the other weights move to ``device`` in ``dtype`` (fp32 parameters stay fp32)."""

    ARCH = ""                           # how errors name the architecture
    DIMS: type                          # the dims class (``from_config``)
    HEAD: tuple[str, ...] = ()          # weights the draft's logits need beyond the MoE inputs

    def __init__(self, spec, dims, device: str | torch.device | None, dtype: torch.dtype):
        self.spec, self.dims, self.dtype = spec, dims, dtype
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @classmethod
    def from_config(cls, spec, config: dict, weights: dict[str, torch.Tensor], embed: torch.Tensor | None = None,
                    device: str | torch.device | None = None, dtype: torch.dtype = torch.bfloat16):
        """The block with its dims read from config.json's contents."""
        return cls(spec, cls.DIMS.from_config(config), weights, embed, device=device, dtype=dtype)

    def _check_complete(self, missing: list[str]) -> None:
        if missing:
            raise ValueError(f"{self.ARCH} MTP layer incomplete: missing "
                             f"{', '.join(self.spec.prefix + k for k in missing[:5])}"
                             + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))

    def _check_head(self) -> None:
        missing = [k for k in self.HEAD if k not in self.W]
        if missing:
            raise ValueError(f"{self.ARCH} MTP layer lacks {', '.join(self.spec.prefix + k for k in missing)} "
                             "(needed for the draft's logits)")

    def _ffn_input(self, hidden, next_token, position, mode, seq_lens) -> tuple:
        """(the residual before the FFN sub-layer, X = its normed input, …) — per architecture."""
        raise NotImplementedError

    def route(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stacked bf16: w1 [E, I, D], w2 [E, D, I], w3 [E, I, D]."""
        return self._w["w1"], self._w["w2"], self._w["w3"]

    def moe_inputs(self, hidden: torch.Tensor, next_token: torch.Tensor, position: torch.Tensor, mode: str,
                   seq_lens: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(X [T, H] in the compute dtype, topk_ids [T, k] int64, topk_weights [T, k] fp32) of store
        rows (``mode`` identity or full; full: ``seq_lens`` whole sequences) — see stage/replay.py."""
        X = self._ffn_input(hidden, next_token, position, mode, seq_lens)[1]
        ids, weights = self.route(X)
        return X, ids, weights

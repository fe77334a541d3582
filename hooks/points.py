"""Capture points, declared as data: where in which model tree a tensor is read, and how it
maps to store rows (hidden, input ids, positions).

A point names, per engine ("vllm" | "hf") and architecture, the module holding each tensor
(a dotted path under the tree's root, ``*`` matching one level, plus the class expected
there) and whether it is read from the module's inputs (a forward pre-hook) or output.
Two points exist:

* ``target_pre_head`` (default) — on the target model, the state vLLM hands the MTP layer as
  ``previous_hidden_states``: DSV3 the final hidden states; DSV4 the residual streams after
  the last layer's final hc_post, *before* ``hc_head`` ([T, hc_mult, D], the input of
  vLLM's ``HCHeadOp`` / transformers' ``DeepseekV4HyperHead``). Needs no MTP weights and no
  speculative decoding; sees every prompt and generated position.
* ``mtp_input`` — a pre-hook on the MTP layer itself (the seed's method) while the server
  runs MTP speculative decoding: ``previous_hidden_states`` with the shifted ``input_ids``
  (the token after each position, so ``ids_offset`` 1).

Both give the same row for position p: (state at p, token at p+1).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorRef:
    module: str                 # dotted path under the tree root ("" = the root), "*" = any one level
    cls: str                    # class name expected at that path
    io: str                     # "input" (forward pre-hook) | "output" (forward hook)
    kwarg: str | None = None    # keyword argument name (tried first) ...
    index: int | None = None    # ... else positional argument / output tuple index (None: whole output)


@dataclass(frozen=True)
class CapturePoint:
    name: str
    engine: str                 # "vllm" | "hf"
    arch: str                   # config.architectures[0]
    tree: str                   # "target" | "drafter" (vLLM's speculative proposer model)
    hidden: TensorRef
    input_ids: TensorRef
    positions: TensorRef | None  # None: the engine knows positions itself (hf, batch of one)
    ids_offset: int = 0          # 0: ids are the token at each position; 1: the next token
    hc_mult_key: str | None = None  # config key of the number of residual streams per row
    fresh: bool = True           # the hidden tensor is allocated by each forward (eager mode), not a
                                 # buffer rewritten in place: its GPU copy may overlap later kernels


def _root_ids(cls: str, io: str = "input") -> TensorRef:
    return TensorRef("", cls, io, kwarg="input_ids", index=0)


_V3 = "DeepseekV3ForCausalLM"
_V4 = "DeepseekV4ForCausalLM"
POINTS: tuple[CapturePoint, ...] = (
    # vLLM, DeepSeek-V3: the CausalLM's forward returns the final hidden states (logits are
    # computed separately). Hook the top-level module, not the decoder stack: vLLM may
    # torch.compile the stack, and a compiled module's own hooks never fire.
    CapturePoint("target_pre_head", "vllm", _V3, "target",
                 hidden=TensorRef("", _V3, "output"),
                 input_ids=TensorRef("", _V3, "output", kwarg="input_ids", index=0),
                 positions=TensorRef("", _V3, "output", kwarg="positions", index=1)),
    CapturePoint("mtp_input", "vllm", _V3, "drafter",
                 hidden=TensorRef("model.layers.*", "DeepSeekMultiTokenPredictorLayer", "input",
                                  kwarg="previous_hidden_states", index=2),
                 input_ids=TensorRef("model.layers.*", "DeepSeekMultiTokenPredictorLayer", "input",
                                     kwarg="input_ids", index=0),
                 positions=TensorRef("model.layers.*", "DeepSeekMultiTokenPredictorLayer", "input",
                                     kwarg="positions", index=1),
                 ids_offset=1, fresh=False),  # the proposer's persistent hidden-states buffer
    # vLLM, DeepSeek-V4 (dsv4-mtp-reference.md §3): the input of model.hc_head_op. A decoder
    # layer's output is not enough — vLLM's layers return the un-posted tuple.
    CapturePoint("target_pre_head", "vllm", _V4, "target",
                 hidden=TensorRef("model.hc_head_op", "HCHeadOp", "input", index=0),
                 input_ids=_root_ids(_V4),
                 positions=TensorRef("", _V4, "input", kwarg="positions", index=1),
                 hc_mult_key="hc_mult"),
    # transformers
    CapturePoint("target_pre_head", "hf", _V3, "target",
                 hidden=TensorRef("model.norm", "DeepseekV3RMSNorm", "output"),
                 input_ids=_root_ids(_V3), positions=None),
    CapturePoint("target_pre_head", "hf", _V4, "target",
                 hidden=TensorRef("model.hc_head", "DeepseekV4HyperHead", "input", index=0),
                 input_ids=_root_ids(_V4), positions=None, hc_mult_key="hc_mult"),
)


class CapturePointError(ValueError):
    """A capture point that cannot be used with this model (raised at start-up)."""


def find_point(name: str, engine: str, arch: str) -> CapturePoint:
    for p in POINTS:
        if (p.name, p.engine, p.arch) == (name, engine, arch):
            return p
    known = sorted({(p.name, p.arch) for p in POINTS if p.engine == engine})
    if not any(p.arch == arch and p.engine == engine for p in POINTS):
        raise CapturePointError(f"no capture points are declared for architecture {arch!r} on engine {engine!r} "
                                f"(declared: {', '.join(f'{n}@{a}' for n, a in known)})")
    raise CapturePointError(f"capture point {name!r} is not declared for {arch} on engine {engine!r} "
                            f"(declared: {', '.join(f'{n}@{a}' for n, a in known)})")


def row_shape(point: CapturePoint, hf_config) -> tuple[int, int]:
    """(hidden_size, hc_mult) of the point's rows for a model config."""
    hc = int(getattr(hf_config, point.hc_mult_key)) if point.hc_mult_key else 1
    return int(hf_config.hidden_size), hc


def resolve(ref: TensorRef, root: torch.nn.Module, what: str) -> list[torch.nn.Module]:
    """The modules ``ref`` names under ``root``; a clear error when none match."""
    found, near = [], []
    for path, mod in root.named_modules():
        if fnmatch.fnmatchcase(path, ref.module) and path.count(".") == ref.module.count("."):
            if type(mod).__name__ == ref.cls:
                found.append(mod)
            else:
                near.append(f"{path or '<root>'} ({type(mod).__name__})")
    if not found:
        hint = f"; at that path: {', '.join(near[:4])}" if near else ""
        raise CapturePointError(f"{what}: no module {ref.module or '<root>'!r} of class {ref.cls} in "
                                f"{type(root).__name__}{hint}")
    return found


def read(ref: TensorRef, args: tuple, kwargs: dict, output=None):
    """The tensor ``ref`` names in one call's arguments (or output)."""
    if ref.io == "output" and ref.kwarg is None:
        out = output
        if ref.index is not None or isinstance(out, (tuple, list)):
            out = out[ref.index or 0]
        return out
    if ref.kwarg is not None and ref.kwarg in kwargs:
        return kwargs[ref.kwarg]
    if ref.index is not None and ref.index < len(args):
        return args[ref.index]
    return None

"""Capture points, declared as data: where in which model tree a tensor is read, and how it
maps to store rows (hidden, input ids, positions).

A point names, per engine ("vllm" | "hf"), architecture and — for vLLM, which ships some
models once per platform (``vllm/models/deepseek_v4/{nvidia,amd,xpu,cpu}``) — the module of
the model class actually built, where each tensor is: a dotted path under the tree's root
(``*`` matching one level) plus the class expected there, and how it is read:

* ``input`` / ``output``: a forward pre-hook / forward hook on that module;
* ``call``: the arguments of a function that module's forward calls through its Python
  module's namespace (the hook rebinds that name, and restores it on removal);
* ``buffer``: a tensor attribute the model fills in place during its forward, read after
  the forward returns.

The hidden state may list alternatives, tried in order (the first that resolves is used).
Two points exist:

* ``target_pre_head`` (default) — on the target model, the state vLLM hands the MTP layer as
  ``previous_hidden_states``: DSV3 the final hidden states; DSV4 the residual streams after
  the last layer's final hc_post, *before* hc_head ([T, hc_mult, D]). Needs no MTP weights
  and no speculative decoding; sees every prompt and generated position.
* ``mtp_input`` — a pre-hook on the MTP layer itself while the server runs MTP speculative
  decoding: ``previous_hidden_states`` with the shifted ``input_ids`` (the token after each
  position, so ``ids_offset`` 1).

Both give the same row for position p: (state at p, token at p+1).
"""
from __future__ import annotations

import difflib
import fnmatch
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are met: the declarations are read without it
    import torch


@dataclass(frozen=True)
class TensorRef:
    module: str                 # dotted path under the tree root ("" = the root), "*" = any one level
    cls: str                    # class name expected at that path
    io: str                     # "input" | "output" | "call" | "buffer" (see the module docstring)
    kwarg: str | None = None    # keyword argument name (tried first) ...
    index: int | None = None    # ... else positional argument / output tuple index (None: whole output)
    name: str | None = None     # "call": the function's name in cls's Python module; "buffer": the attribute
    bound: tuple[int, str] | None = None  # "call": the call is this module's when positional arg i is
                                          # its attribute (another caller of the function is ignored)

    @property
    def at_root(self) -> bool:
        return self.module == ""

    def describe(self) -> str:
        where = f"{self.module or '<root>'} ({self.cls})"
        if self.io == "call":
            return f"argument {self.index} of {self.name}() as called by {where}"
        if self.io == "buffer":
            return f"buffer {where}.{self.name}"
        return f"{self.io} of {where}"


@dataclass(frozen=True)
class CapturePoint:
    name: str
    engine: str                 # "vllm" | "hf"
    arch: str                   # config.architectures[0]
    tree: str                   # "target" | "drafter" (vLLM's speculative proposer model)
    hidden: tuple[TensorRef, ...]  # alternatives, the first that resolves is used
    input_ids: TensorRef
    positions: TensorRef | None  # None: the engine knows positions itself (hf, batch of one)
    ids_offset: int = 0          # 0: ids are the token at each position; 1: the next token
    hc_mult_key: str | None = None  # config key of the number of residual streams per row
    fresh: bool = True           # the hidden tensor is allocated by each forward (eager mode), not a
                                 # buffer rewritten in place: its GPU copy may overlap later kernels
    where: tuple[str, ...] = ("*",)  # fnmatch patterns: the Python module of the tree root's class


def _root_ids(cls: str, io: str = "input") -> TensorRef:
    return TensorRef("", cls, io, kwarg="input_ids", index=0)


_V3 = "DeepseekV3ForCausalLM"
_V4 = "DeepseekV4ForCausalLM"
_V4_TREES = "vllm.models.deepseek_v4.{}.*"
# DSV4 on every platform: vLLM's own MTP buffer when it allocates one (MTP/EAGLE speculative
# decoding) — the same state, filled inside the forward, read after it.
_V4_MTP_BUFFER = TensorRef("model", "DeepseekV4Model", "buffer", name="_mtp_hidden_buffer")
_V4_MTP_LAYER = "DeepSeekV4MultiTokenPredictorLayer"


def _mtp_layer_point(arch: str, layer_cls: str, where: tuple[str, ...] = ("*",), hc_mult_key=None) -> CapturePoint:
    """The MTP layer's inputs, forward(input_ids, positions, previous_hidden_states, ...)."""
    def ref(kwarg, index):
        return TensorRef("model.layers.*", layer_cls, "input", kwarg=kwarg, index=index)
    return CapturePoint("mtp_input", "vllm", arch, "drafter", hidden=(ref("previous_hidden_states", 2),),
                        input_ids=ref("input_ids", 0), positions=ref("positions", 1), ids_offset=1,
                        hc_mult_key=hc_mult_key, fresh=False,  # the proposer's persistent hidden-states buffer
                        where=where)


POINTS: tuple[CapturePoint, ...] = (
    # vLLM, DeepSeek-V3: the CausalLM's forward returns the final hidden states (logits are
    # computed separately). The root is outside the torch.compile'd decoder stack.
    CapturePoint("target_pre_head", "vllm", _V3, "target",
                 hidden=(TensorRef("", _V3, "output"),),
                 input_ids=TensorRef("", _V3, "output", kwarg="input_ids", index=0),
                 positions=TensorRef("", _V3, "output", kwarg="positions", index=1)),
    _mtp_layer_point(_V3, "DeepSeekMultiTokenPredictorLayer"),
    # vLLM, DeepSeek-V4, NVIDIA tree (every CUDA GPU; dsv4-mtp-reference.md §3): DeepseekV4Model
    # applies hc_head with the module-level kernel hc_head_fused_kernel_tilelang(hidden_states,
    # self.hc_head_fn, ...); its first argument is the pre-hc_head state. A decoder layer's
    # output is not enough — vLLM's layers return the un-posted tuple.
    CapturePoint("target_pre_head", "vllm", _V4, "target",
                 hidden=(_V4_MTP_BUFFER,
                         TensorRef("model", "DeepseekV4Model", "call", index=0,
                                   name="hc_head_fused_kernel_tilelang", bound=(1, "hc_head_fn"))),
                 input_ids=_root_ids(_V4),
                 positions=TensorRef("", _V4, "input", kwarg="positions", index=1),
                 hc_mult_key="hc_mult", where=(_V4_TREES.format("nvidia"),)),
    # CPU, AMD and XPU trees: the same state is the input of the HCHeadOp module.
    CapturePoint("target_pre_head", "vllm", _V4, "target",
                 hidden=(_V4_MTP_BUFFER, TensorRef("model.hc_head_op", "HCHeadOp", "input", index=0)),
                 input_ids=_root_ids(_V4),
                 positions=TensorRef("", _V4, "input", kwarg="positions", index=1),
                 hc_mult_key="hc_mult", where=tuple(_V4_TREES.format(t) for t in ("cpu", "amd", "xpu"))),
    # previous_hidden_states arrives flat, (T, hc_mult·D). vLLM's CPU tree has no DSV4 MTP.
    _mtp_layer_point(_V4, _V4_MTP_LAYER, tuple(_V4_TREES.format(t) for t in ("nvidia", "amd", "xpu")),
                     hc_mult_key="hc_mult"),
    # transformers
    CapturePoint("target_pre_head", "hf", _V3, "target",
                 hidden=(TensorRef("model.norm", "DeepseekV3RMSNorm", "output"),),
                 input_ids=_root_ids(_V3), positions=None),
    CapturePoint("target_pre_head", "hf", _V4, "target",
                 hidden=(TensorRef("model.hc_head", "DeepseekV4HyperHead", "input", index=0),),
                 input_ids=_root_ids(_V4), positions=None, hc_mult_key="hc_mult"),
)


class CapturePointError(ValueError):
    """A capture point that cannot be used with this model (raised at start-up)."""


class EagerRequired(CapturePointError):
    """A capture point this server cannot read with compilation / CUDA graphs on: the same
    server started with ``--enforce-eager`` can."""


def needs_eager(name: str) -> bool:
    """Whether point ``name`` needs ``--enforce-eager`` on every model tree: it is read inside
    vLLM's speculative drafter, which vLLM compiles and replays in CUDA graphs, where hooks do
    not run. (A target point needs it only on a tree where vLLM torch.compiles the module it
    reads; that is known once the tree is built: ``plugin.compile_refusal``.)"""
    return any(p.tree == "drafter" for p in POINTS if p.name == name)


def find_point(name: str, engine: str, arch: str, tree_module: str = "") -> CapturePoint:
    """The point ``name`` for ``arch`` whose ``where`` matches ``tree_module`` (the Python module
    of the model class actually built; "" matches only points declared for every tree)."""
    declared = [p for p in POINTS if p.engine == engine]
    known = ", ".join(sorted({f"{p.name}@{p.arch}" for p in declared}))
    if not any(p.arch == arch for p in declared):
        raise CapturePointError(f"no capture points are declared for architecture {arch!r} on engine {engine!r} "
                                f"(declared: {known})")
    named = [p for p in declared if (p.name, p.arch) == (name, arch)]
    if not named:
        raise CapturePointError(f"capture point {name!r} is not declared for {arch} on engine {engine!r} "
                                f"(declared: {known})")
    for p in named:
        if any(fnmatch.fnmatchcase(tree_module, w) for w in p.where):
            return p
    trees = ", ".join(w for p in named for w in p.where)
    raise CapturePointError(f"capture point {name!r} for {arch} is declared for the model trees {trees}; this "
                            f"model's class comes from {tree_module or 'an unnamed module'!r}, which matches none")


def row_shape(point: CapturePoint, hf_config) -> tuple[int, int]:
    """(hidden_size, hc_mult) of the point's rows for a model config."""
    hc = int(getattr(hf_config, point.hc_mult_key)) if point.hc_mult_key else 1
    return int(hf_config.hidden_size), hc


def resolve(ref: TensorRef, root: torch.nn.Module, what: str) -> list[torch.nn.Module]:
    """The modules ``ref`` names under ``root``; a clear error when none match (or, for
    ``call``/``buffer`` refs, when the function / tensor is not there)."""
    import torch

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
    for mod in found:
        if ref.io == "call":
            ns = sys.modules.get(type(mod).__module__)
            if not callable(getattr(ns, ref.name, None)):
                like = difflib.get_close_matches(ref.name, [n for n in vars(ns or object)
                                                            if callable(getattr(ns, n, None))], n=4, cutoff=0.6)
                raise CapturePointError(f"{what}: {type(mod).__module__} has no function {ref.name!r}, which "
                                        f"{ref.cls}.forward was expected to call (similar names there: "
                                        f"{', '.join(like) or 'none'})")
            if ref.bound is not None and not hasattr(mod, ref.bound[1]):
                raise CapturePointError(f"{what}: {ref.cls} has no attribute {ref.bound[1]!r} to recognise its "
                                        f"own calls of {ref.name}")
        elif ref.io == "buffer" and not isinstance(getattr(mod, ref.name, None), torch.Tensor):
            raise CapturePointError(f"{what}: {ref.module}.{ref.name} ({ref.cls}) is not a tensor here "
                                    f"({type(getattr(mod, ref.name, None)).__name__})")
    return found


def resolve_hidden(point: CapturePoint, root: torch.nn.Module, what: str) -> tuple[TensorRef, list[torch.nn.Module]]:
    """The first of the point's hidden alternatives that resolves on ``root``; if none does,
    one error listing what each looked for and what is there."""
    errors = []
    for ref in point.hidden:
        try:
            return ref, resolve(ref, root, what)
        except CapturePointError as e:
            errors.append(f"{ref.describe()}: {str(e).removeprefix(what + ': ')}")
    raise CapturePointError(f"{what}: none of the declared places resolves on {type(root).__module__}."
                            f"{type(root).__name__} — " + "; ".join(errors))


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

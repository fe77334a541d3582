"""Install a capture point's hooks on a model tree (engine-independent).

``on_rows(hidden [T, width], input_ids [T], positions [T] | None)`` receives views of live
tensors: it must copy them (capture's staging does) and must not keep them.

Two ways to emit a forward's rows:

* in the forward (``boundary=False``, eager engines): every ref gets a hook; refs on an
  enclosing module's inputs, or on the same call, fire first, and the rows are emitted when
  the hidden-state hook fires.
* after the forward (``boundary=True``): the engine calls ``Attachment.after_forward(args,
  kwargs, output)`` with the root's call — outside any torch.compile'd or CUDA-graph region,
  so it runs on every step. Root refs are read from that call; a ``buffer`` ref is read
  then; a hidden ref inside the forward only copies its tensor into a stash buffer allocated
  here (before any graph capture, so a captured graph replays the copy into the same
  memory), and the stash is read then. Ids and positions must be root refs.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch

from .points import CapturePoint, CapturePointError, TensorRef, read, resolve, resolve_hidden

OnRows = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], None]


class _FunctionHook:
    """Rebinds ``name`` in a Python module's namespace to a wrapper that calls ``take(args,
    kwargs)`` before the original; ``remove`` restores the binding (or, if something wrapped
    it since, leaves a wrapper that only passes calls through)."""

    def __init__(self, namespace, name: str, take):
        self.namespace, self.name, self.active = namespace, name, True
        self.original = original = getattr(namespace, name)

        def hooked(*args, **kwargs):
            if self.active:
                take(args, kwargs)
            return original(*args, **kwargs)
        hooked.__wrapped__ = original
        self.hooked = hooked
        setattr(namespace, name, hooked)

    def remove(self) -> None:
        self.active = False
        if getattr(self.namespace, self.name, None) is self.hooked:
            setattr(self.namespace, self.name, self.original)


class Attachment:
    """One point's hooks on one tree."""

    def __init__(self, point: CapturePoint, hidden: TensorRef, handles: list, stash: torch.Tensor | None,
                 buffer_of: torch.nn.Module | None, on_rows: OnRows, width: int):
        self.point, self.hidden, self.handles = point, hidden, handles
        self.stash, self.buffer_of, self.on_rows, self.width = stash, buffer_of, on_rows, width
        self.stash_writes = 0           # eager calls of the in-forward hook (replays run no Python)
        self.removed = False

    def after_forward(self, args: tuple, kwargs: dict, output) -> None:
        """The root's call has returned: emit its rows (``boundary=True`` only)."""
        if self.removed:
            return
        p = self.point
        ids = read(p.input_ids, args, kwargs, output)
        if ids is None:
            raise CapturePointError(f"capture point {p.name!r}: the forward got no input_ids (prompt embeddings "
                                    "are not supported)")
        positions = read(p.positions, args, kwargs, output) if p.positions is not None else None
        n = ids.reshape(-1).shape[0]
        if self.stash is not None:
            if self.stash_writes == 0:
                raise CapturePointError(f"capture point {p.name!r}: {self.hidden.describe()} never ran in the "
                                        "model's forward, so there are no rows to read")
            hidden = self.stash[:n]
        elif self.buffer_of is not None:
            hidden = getattr(self.buffer_of, self.hidden.name)[:n]
        else:
            hidden = read(self.hidden, args, kwargs, output)
        self.on_rows(hidden.reshape(-1, self.width), ids.reshape(-1), _flat(positions))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.removed = True


def attach(point: CapturePoint, root: torch.nn.Module, on_rows: OnRows, width: int, boundary: bool = False,
           stash_rows: int = 0, dtype: torch.dtype | None = None, device=None) -> Attachment:
    """Hook ``point`` into ``root`` (the tree the point names). With ``boundary`` the caller
    invokes ``after_forward`` after each call of ``root``; an in-forward hidden ref then
    needs ``stash_rows`` (the most tokens one forward carries), ``dtype`` and ``device``."""
    what = f"capture point {point.name!r} ({point.arch}, {point.engine})"
    hidden_ref, hidden_mods = resolve_hidden(point, root, f"{what} hidden")
    refs = {"input_ids": point.input_ids}
    if point.positions is not None:
        refs["positions"] = point.positions
    for key, ref in refs.items():
        resolve(ref, root, f"{what} {key}")
        if boundary and not ref.at_root:
            raise CapturePointError(f"{what}: {key} is read inside the forward ({ref.describe()}); with rows "
                                    "emitted after the forward, ids and positions must come from the root's call")
    if boundary:
        return _attach_at_boundary(point, hidden_ref, hidden_mods, on_rows, width, stash_rows, dtype, device)
    return _attach_in_forward(point, root, hidden_ref, hidden_mods, refs, on_rows, width)


def _attach_at_boundary(point, ref: TensorRef, mods, on_rows, width, stash_rows, dtype, device) -> Attachment:
    if ref.at_root:
        return Attachment(point, ref, [], None, None, on_rows, width)
    if ref.io == "buffer":
        return Attachment(point, ref, [], None, mods[0], on_rows, width)
    if stash_rows <= 0:
        raise ValueError(f"capture point {point.name!r} reads {ref.describe()} inside the forward: "
                         "a stash of stash_rows rows is needed")
    stash = torch.empty(stash_rows, width, dtype=dtype, device=device)
    att = Attachment(point, ref, [], stash, None, on_rows, width)

    def take(args, kwargs, output=None):
        x = read(ref, args, kwargs, output)
        x = x.reshape(-1, width)
        if x.shape[0] > stash.shape[0]:
            raise CapturePointError(f"capture point {point.name!r}: a forward of {x.shape[0]} tokens exceeds the "
                                    f"stash of {stash.shape[0]} rows (max_num_batched_tokens)")
        stash[: x.shape[0]].copy_(x)
        att.stash_writes += 1
    att.handles = [_install(ref, mod, take) for mod in mods]
    return att


def _attach_in_forward(point, root, hidden_ref, hidden_mods, refs, on_rows, width) -> Attachment:
    sites: dict[tuple, tuple[torch.nn.Module, TensorRef, list]] = {}  # (module, io, function) → entries
    for key, ref in [("hidden", hidden_ref)] + list(refs.items()):
        mods = hidden_mods if key == "hidden" else resolve(ref, root, key)
        if ref.io == "buffer":  # filled during the forward: read when the root's forward returns
            site = (root, TensorRef("", type(root).__name__, "output"), [])
            sites.setdefault((id(root), "output", None), site)[2].append((key, ref, mods[0]))
            continue
        for mod in mods:
            sites.setdefault((id(mod), ref.io, ref.name), (mod, ref, []))[2].append((key, ref, None))
    current: dict[str, torch.Tensor | None] = {}

    def take(entries, args, kwargs, output=None):
        for key, ref, owner in entries:
            current[key] = getattr(owner, ref.name) if owner is not None else read(ref, args, kwargs, output)
        if any(k == "hidden" for k, _, _ in entries):
            hidden, ids = current.pop("hidden"), current.get("input_ids")
            if hidden is None or ids is None:
                raise CapturePointError(f"capture point {point.name!r}: hook fired without "
                                        f"{'hidden states' if hidden is None else 'input_ids'}")
            ids = ids.reshape(-1)
            if hidden_ref.io == "buffer":
                hidden = hidden[: ids.shape[0]]
            on_rows(hidden.reshape(-1, width), ids, _flat(current.get("positions")))

    handles = [_install(site_ref, mod, lambda a, kw, out=None, e=entries: take(e, a, kw, out))
               for mod, site_ref, entries in sites.values()]
    return Attachment(point, hidden_ref, handles, None, None, on_rows, width)


def _install(ref: TensorRef, mod: torch.nn.Module, take):
    """One hook at ``ref``'s site on ``mod``: ``take(args, kwargs[, output])``."""
    if ref.io == "input":
        return mod.register_forward_pre_hook(lambda m, a, kw: take(a, kw), with_kwargs=True)
    if ref.io == "output":
        return mod.register_forward_hook(lambda m, a, kw, out: take(a, kw, out), with_kwargs=True)
    if ref.io == "call":
        def take_own(args, kwargs):
            if ref.bound is None or (len(args) > ref.bound[0] and args[ref.bound[0]] is getattr(mod, ref.bound[1])):
                take(args, kwargs)
        return _FunctionHook(sys.modules[type(mod).__module__], ref.name, take_own)
    raise CapturePointError(f"{ref.describe()}: no hook for io {ref.io!r}")


def _flat(t):
    return None if t is None else t.reshape(-1)

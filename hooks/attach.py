"""Install a capture point's torch hooks on a model tree (engine-independent).

Each module a point names gets one hook; ids/positions are read when their hook fires and
the rows are emitted when the hidden-state hook fires (refs on an enclosing module's
*inputs*, or on the same call, always fire first). ``on_rows(hidden [T, width],
input_ids [T], positions [T] | None)`` receives views of the live tensors: it must copy
(capture's staging does) and must not keep them.
"""
from __future__ import annotations

from typing import Callable

import torch

from .points import CapturePoint, CapturePointError, TensorRef, read, resolve

OnRows = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], None]


def attach(point: CapturePoint, root: torch.nn.Module, on_rows: OnRows, width: int) -> list:
    """Hook ``point`` into ``root`` (the tree the point names); returns the hook handles."""
    refs = {"hidden": point.hidden, "input_ids": point.input_ids}
    if point.positions is not None:
        refs["positions"] = point.positions
    by_site: dict[tuple[int, str], tuple[torch.nn.Module, list[tuple[str, TensorRef]]]] = {}
    for key, ref in refs.items():
        for mod in resolve(ref, root, f"capture point {point.name!r} ({point.arch}, {point.engine}) {key}"):
            by_site.setdefault((id(mod), ref.io), (mod, []))[1].append((key, ref))
    current: dict[str, torch.Tensor | None] = {}

    def take(entries, args, kwargs, output=None):
        for key, ref in entries:
            current[key] = read(ref, args, kwargs, output)
        if any(k == "hidden" for k, _ in entries):
            hidden, ids = current.pop("hidden"), current.get("input_ids")
            if hidden is None or ids is None:
                raise CapturePointError(f"capture point {point.name!r}: hook fired without "
                                        f"{'hidden states' if hidden is None else 'input_ids'}")
            on_rows(hidden.reshape(-1, width), ids.reshape(-1), _flat(current.get("positions")))

    handles = []
    for (_, io), (mod, entries) in by_site.items():
        if io == "input":
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, kw, e=entries: take(e, a, kw), with_kwargs=True))
        else:
            handles.append(mod.register_forward_hook(
                lambda m, a, kw, out, e=entries: take(e, a, kw, out), with_kwargs=True))
    return handles


def _flat(t):
    return None if t is None else t.reshape(-1)

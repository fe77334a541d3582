"""Rows of batched forwards → whole sequences.

Rows arrive per step, tagged with their request and position. A position can be computed
more than once — a speculative token that was rejected, a request preempted and
recomputed, a re-verified draft — so rows are kept per request and, when the request
finishes and its final tokens are known, the *last* row written for each position wins.
Each kept row's input token is checked against the final token list, so a row computed
from a token that did not survive can never be written.

``ids_offset`` says which token a row's ids are: 0 — the token at the row's position
(target forward), 1 — the token after it (the MTP layer's shifted ``input_ids``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np


@dataclass
class Sequence:
    hidden: np.ndarray       # uint16 [n, width] (bf16 bits), positions 0..n-1
    next_token: np.ndarray   # int32 [n]
    position: np.ndarray     # int32 [n]
    superseded: int          # rows of this request not written (recomputed or past the end)


class _Chunk(NamedTuple):
    """Rows of one request from one forward."""
    positions: np.ndarray    # int64 [n]
    ids: np.ndarray          # int64 [n]
    hidden: np.ndarray       # uint16 [n, width]


@dataclass
class _Pending:
    chunks: list[_Chunk] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(len(c.positions) for c in self.chunks)


class IncompleteSequence(Exception):
    """A finished request lacks a valid row for some position (never written, so counted)."""


class SequenceAssembler:
    def __init__(self, ids_offset: int = 0):
        if ids_offset not in (0, 1):
            raise ValueError(f"ids_offset must be 0 or 1, got {ids_offset}")
        self.ids_offset = ids_offset
        self.pending: dict[str, _Pending] = {}

    def add(self, req_id: str, positions: np.ndarray, ids: np.ndarray, hidden: np.ndarray) -> None:
        self.pending.setdefault(req_id, _Pending()).chunks.append(_Chunk(positions, ids, hidden))

    @property
    def open_requests(self) -> int:
        """Requests with rows and no finish yet."""
        return len(self.pending)

    def rows(self, req_id: str | None = None) -> int:
        """Rows held for request ``req_id`` (None: for all open requests)."""
        if req_id is None:
            return sum(p.rows for p in self.pending.values())
        p = self.pending.get(req_id)
        return 0 if p is None else p.rows

    def finish(self, req_id: str, tokens: list[int]) -> Sequence | None:
        """The request's whole sequence: positions 0..len(tokens)−2 (the last token is
        sampled, never fed back), next_token[p] = tokens[p+1]. None if it has no rows."""
        p = self.pending.pop(req_id, None)
        if p is None or not p.chunks:
            return None
        if len(p.chunks) == 1:  # one forward held the whole sequence: no copy here
            pos, ids, hidden = p.chunks[0]
        else:
            pos = np.concatenate([c.positions for c in p.chunks])
            ids = np.concatenate([c.ids for c in p.chunks])
            hidden = np.concatenate([c.hidden for c in p.chunks])
        n = len(tokens) - 1
        # Last write per position: unique over the reversed rows gives each position's last index.
        uniq, rev_idx = np.unique(pos[::-1], return_index=True)
        last = len(pos) - 1 - rev_idx
        keep = uniq < n
        uniq, last = uniq[keep], last[keep]
        toks = np.asarray(tokens, dtype=np.int64)
        if len(uniq) != n or (n and (uniq[0] != 0 or uniq[-1] != n - 1)):
            missing = sorted(set(range(n)) - set(uniq.tolist()))[:8]
            raise IncompleteSequence(f"request {req_id}: rows for {len(uniq)} of {n} positions "
                                     f"(missing e.g. {missing})")
        bad = np.nonzero(ids[last] != toks[np.arange(n) + self.ids_offset])[0]
        if len(bad):
            raise IncompleteSequence(f"request {req_id}: {len(bad)} rows were computed from tokens that "
                                     f"are not in the final sequence (positions {bad[:8].tolist()})")
        # Rows already in order, nothing recomputed (the common case): a view, not a gather.
        rows = hidden[:n] if np.array_equal(last, np.arange(n)) else hidden[last]
        return Sequence(hidden=rows, next_token=toks[1:n + 1].astype(np.int32),
                        position=np.arange(n, dtype=np.int32), superseded=len(pos) - n)

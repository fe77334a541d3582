"""What capture writes into: whole sequences, in position order.

``requant.storage.GroupWriter`` is the production sink (``open_store_sink``); the protocol
keeps the pipeline independent of how rows are persisted.
"""
from __future__ import annotations

from typing import Protocol


class RowSink(Protocol):
    def append_sequence(self, seq_id: int, hidden, next_token, position, prompt_id: str = "",
                        replica: int = 0) -> None:
        """Persist one sequence: hidden [T, width] bf16 (or its uint16 bits), next_token [T], position [T]."""

    def flush(self) -> None:
        """Make everything appended so far durable/visible."""

    def close(self) -> None: ...


def open_store_sink(store: str, meta, writer: str):
    """Writer group ``writer`` of the capture store at ``store`` (path or URL), created with
    ``meta`` (a ``requant.storage.StoreMeta``) when absent. A store already there must hold
    ``meta``'s capture point and row width; an unusable store fails here, before a row is
    captured."""
    from requant.storage import CaptureStore

    s = CaptureStore.create(store, meta, exist_ok=True)  # unwritable / other row width: fails here
    if s.meta.capture_point != meta.capture_point:
        raise ValueError(f"{store}: store holds capture point {s.meta.capture_point!r}, not {meta.capture_point!r}")
    return s.writer(writer)

"""What capture writes into: whole sequences, in position order.

``requant.storage.GroupWriter`` is the production sink; the protocol keeps capture/
independent of how rows are persisted.
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

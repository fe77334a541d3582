"""JSON files of the orchestrator's jobs (control-plane records, results, progress), written
atomically: a reader sees the old file or the new one, never a torn one."""
from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict


class JobResult(BaseModel):
    """``result.json`` of a control-plane job: whether it succeeded (what the API's state
    follows), why not, and the kind's own outcome (paths, counts) as further fields."""
    model_config = ConfigDict(extra="allow")

    ok: bool
    error: str | None = None

    def write(self, path: str | Path) -> None:
        write_json(path, self.model_dump())


def write_json(path: str | Path, data: dict, indent: int | None = 1, durable: bool = True) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place;
    ``durable``: fsynced first (records that must survive a crash; progress files need not)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=indent)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | Path) -> dict | None:
    """The file's JSON, or None while it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None

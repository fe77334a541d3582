"""What a server's capture pipelines hold that is not committed yet, for whoever drains the
server (the capture job): one small JSON file per process, replaced whole on each update.

    {"pid": 123, "beat": 1754000000.0, "idle": true,
     "points": {"target_pre_head": {"idle": true, "queued": 0, "open_requests": 0,
                                    "pending_rows": 0, "uncommitted_sequences": 0,
                                    "committed_sequences": 12, "commits": 3, "error": ""}}}

``idle`` is exact, not a sample: a pipeline is shown busy (in the producer's own call, before
the hook that handed it rows or a finished request returns) and shown idle again only by its
writer thread once everything it was given is committed (or dropped, and counted). A
request's rows enter the pipeline in the forward that computes them, so a reader that sees
the engine with no request running or waiting and *then* reads ``idle`` knows the store holds
every sequence that server will ever write for its requests so far.
``committed_sequences`` is the writer group's committed count as of that moment: a reader
that has read fewer sequences of the group has not caught up with the store yet.
``beat`` is stamped by the writer thread at least every ``Capturer.idle_commit_s`` while it
runs; a stale beat means its writer thread is stuck (in a commit) or dead.
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from functools import partial


@dataclass(frozen=True)
class PointState:
    """One capture point's pipeline, as its status entry says it."""
    idle: bool
    queued: int = 0                 # queue entries not taken by the writer thread yet
    open_requests: int = 0          # requests with rows and no finish yet
    pending_rows: int = 0           # rows held: of open requests and of sequences not committed
    uncommitted_sequences: int = 0
    committed_sequences: int = 0    # the writer group's committed count
    commits: int = 0
    error: str = ""                 # why the writer thread failed


class PipelineStatus:
    """The status file of one process's capture pipelines (one entry per capture point)."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._points: dict[str, dict] = {}  # point → its PointState as JSON

    def publisher(self, point: str):
        """The callable a ``Capturer`` reports its state through."""
        return partial(self.publish, point)

    def publish(self, point: str, state: PointState) -> None:
        with self._lock:  # writes in the order the states were made: the file never goes back
            self._points[point] = asdict(state)
            doc = {"pid": os.getpid(), "beat": time.time(),
                   "idle": all(p["idle"] for p in self._points.values()), "points": self._points}
            tmp = f"{self.path}.tmp{os.getpid()}"
            try:
                with open(tmp, "w") as f:
                    json.dump(doc, f)
                os.replace(tmp, self.path)  # readers see the old document or the new one, whole
            except OSError as e:
                raise OSError(e.errno, f"{self.path}: cannot write the capture status ({e.strerror or e})") from e


def read_status(path: str) -> dict | None:
    """The status document at ``path`` with ``age_s`` (seconds since its beat, on this
    machine's clock — the writer's), or None while there is none (not started yet)."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("beat"), (int, float)):
        return None
    doc["age_s"] = max(0.0, time.time() - doc["beat"])
    return doc

"""Which prompts a capture job has in its store — the exactly-once bookkeeping.

The store is the truth: a prompt is done when a committed sequence carries its id. Requests
are sent with ``X-Request-Id: rq~<quoted prompt id>~q``; vLLM names the request
``chatcmpl-<that>-<8 random chars>`` and the capture plugin stores that name as the
sequence's ``prompt_id``, so ``prompt_of`` recovers ours from any committed sequence.

The ledger (JSONL beside the store, append-only, fsynced) records prompt ids as the job
*sees them committed* — never before — plus permanent failures. At start it is reconciled
with the store's index (a crash can leave committed sequences not yet ledgered; a ledger
line whose sequence the store lacks — a store deleted or restored — is dropped), so a
restarted job skips exactly what the store holds. A damaged ledger is recovered the same
way: lines that do not parse (a torn last line, flipped bytes) are counted, dropped and the
ledger rewritten; a deleted or foreign ledger is rebuilt from the store. Only permanent
failures are the ledger's alone: a damaged "failed" line means that prompt is tried again.
"""
from __future__ import annotations

import json
import os
import re
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_REQ = re.compile(r"rq~([^~]*)~q")


def request_id(prompt_id: str) -> str:
    """The X-Request-Id for a prompt (ASCII, no '~' inside, so it parses back unambiguously)."""
    return "rq~" + urllib.parse.quote(prompt_id, safe="").replace("~", "%7E") + "~q"


def prompt_of(stored_id: str) -> str | None:
    """Our prompt id from a stored sequence's prompt_id; None for sequences not sent by a job."""
    m = _REQ.search(stored_id)
    return urllib.parse.unquote(m.group(1)) if m else None


def ledger_path(store: str) -> Path:
    """Beside the store: ``runs/cap`` → ``runs/cap.ledger.jsonl``."""
    return Path(str(store).rstrip("/") + ".ledger.jsonl")


@dataclass
class StoreIndex:
    """Incremental view of the prompt ids committed in a store (all writer groups): each
    ``refresh`` reads only the index entries committed since the last one."""

    path: str
    seen: dict[str, int] = field(default_factory=dict)            # group → sequences read
    counts: Counter = field(default_factory=Counter)              # prompt id → committed sequences
    rows: dict[str, int] = field(default_factory=dict)            # group → committed rows
    new: list[str] = field(default_factory=list)

    def refresh(self) -> list[str]:
        """Prompt ids newly committed since the last call (job prompts only)."""
        from requant.storage import CaptureStore
        from requant.storage.schema import NotAStoreError

        try:
            store = CaptureStore.open(self.path)
        except NotAStoreError:  # not created yet: the first replica creates it on model load
            return []
        fresh = []
        for name in store.writer_names():
            k = self.seen.get(name, 0)
            commit, ids = store.prompt_ids(name, start=k)
            self.rows[name] = commit.rows
            for sid in ids:
                pid = prompt_of(sid)
                if pid is not None:
                    self.counts[pid] += 1
                    fresh.append(pid)
            self.seen[name] = commit.sequences
        return fresh

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    def duplicates(self) -> dict[str, int]:
        return {p: c for p, c in self.counts.items() if c > 1}


class Ledger:
    """Append-only JSONL of prompt ids done (seen committed) and failed (permanently)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.done: set[str] = set()
        self.failed: dict[str, str] = {}
        self.damaged = 0  # lines that did not parse (a torn last line after a crash, damage)
        data = self.path.read_bytes() if self.path.exists() else b""
        for line in data.splitlines():
            rec = _record(line)
            if rec is None:
                self.damaged += 1
            elif rec["state"] == "done":
                self.done.add(rec["prompt_id"])
            else:
                self.failed[rec["prompt_id"]] = rec.get("error", "")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a")
        self._torn = bool(data) and not data.endswith(b"\n")  # the next record starts on a line of its own

    def _append(self, recs: list[dict]) -> None:
        if not recs:
            return
        text = ("\n" if self._torn else "") + "".join(json.dumps(r) + "\n" for r in recs)
        try:
            self._f.write(text)
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:  # disk full: the store stays the truth; the next start reconciles
            raise OSError(e.errno, f"{self.path}: cannot append to the capture ledger: {e.strerror or e}") from e
        self._torn = False

    def mark_done(self, prompt_ids: list[str]) -> None:
        new = [p for p in prompt_ids if p not in self.done]
        self.done.update(new)
        now = time.time()
        self._append([{"prompt_id": p, "state": "done", "t": now} for p in new])

    def mark_failed(self, prompt_id: str, error: str) -> None:
        self.failed[prompt_id] = error
        self._append([{"prompt_id": prompt_id, "state": "failed", "error": error, "t": time.time()}])

    def reconcile(self, index: StoreIndex) -> dict:
        """Make the ledger agree with the store: ledger ∖ store is dropped (re-captured),
        store ∖ ledger is appended. Returns what changed."""
        index.refresh()
        in_store = set(index.counts)
        stale = self.done - in_store
        missing = in_store - self.done
        damaged, self.damaged = self.damaged, 0
        if stale or damaged:
            # Rewrite without the stale or damaged lines (temp file + atomic rename: never half a ledger).
            keep = [json.dumps({"prompt_id": p, "state": "done", "t": time.time()}) for p in sorted(self.done & in_store)]
            keep += [json.dumps({"prompt_id": p, "state": "failed", "error": e}) for p, e in self.failed.items()]
            self._f.close()
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w") as f:
                f.write("".join(k + "\n" for k in keep))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self._f = open(self.path, "a")
            self._torn = False
            self.done &= in_store
        self.mark_done(sorted(missing))
        return {"ledgered_not_in_store": len(stale), "in_store_not_ledgered": len(missing),
                "damaged_lines_dropped": damaged}

    def close(self) -> None:
        self._f.close()


def _record(line: bytes) -> dict | None:
    """A ledger line as a record, or None when it is not one (torn, damaged)."""
    try:
        rec = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if (not isinstance(rec, dict) or rec.get("state") not in ("done", "failed")
            or not isinstance(rec.get("prompt_id"), str) or not isinstance(rec.get("error", ""), str)):
        return None
    return rec


def active_writers(store: str) -> list[str]:
    """Writer groups of a local store that some process holds open right now. A job must not
    reconcile while a server of an earlier, killed run is still shutting down: it may commit
    a sequence after the reconcile."""
    from requant.storage import CaptureStore
    from requant.storage.schema import NotAStoreError

    try:
        return CaptureStore.open(store).held_writers()
    except NotAStoreError:
        return []


def wait_writers_idle(store: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while busy := active_writers(store):
        if time.time() > deadline:
            raise RuntimeError(f"{store}: writer groups {busy} are held by running processes (another job or "
                               f"server on this store?); refusing to start — two writers would capture "
                               f"prompts twice")
        time.sleep(0.5)

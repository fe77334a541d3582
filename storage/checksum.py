"""Checksums that bind the files of a format-3 capture store to each other.

Every chunk carries its own crc32c (the codec), which finds flipped bits and cut files but
not a whole file swapped for another store's, nor an edited metadata document. So:

* store metadata: ``requant_store_crc32c`` = crc32c of the canonical JSON of ``requant_store``
  (which holds a random ``uid``);
* commit record: ``{"rows", "sequences", "store": uid, "crc32c"}`` (crc32c of ``uid:rows:sequences``);
* each sequence k: ``index/crc[k]`` = (crc32c of its hidden rows' bytes, of its next_token
  bytes, of its position bytes, crc32c of its index entry — uid, seq, first_row, length,
  replica, the three row checksums and prompt_id).

Rows are read in pieces that need not end on sequence boundaries (batches, chunks):
``combine`` joins the crc32c values of consecutive pieces without their bytes (crc32c is
affine over GF(2): crc(A‖B) = crc(A‖0ⁿ) ⊕ crc(B) ⊕ crc(0ⁿ)).
"""
from __future__ import annotations

import json
import struct
import threading

import crc32c
import numpy as np

ROW_COLUMNS = ("hidden", "next_token", "position")  # the columns index/crc covers, in order
_ZEROS = bytes(1 << 20)


def crc(data) -> int:
    return crc32c.crc32c(data)


def _crc_zeros(n: int, value: int = 0) -> int:
    while n:
        k = min(n, len(_ZEROS))
        value = crc32c.crc32c(memoryview(_ZEROS)[:k], value=value)
        n -= k
    return value


def combine(c1: int, c2: int, n2: int) -> int:
    """crc32c of A‖B from c1 = crc32c(A), c2 = crc32c(B) and n2 = len(B) in bytes."""
    return _crc_zeros(n2, c1) ^ c2 ^ _crc_zeros(n2)


def meta_crc(meta: dict) -> int:
    """Of the store metadata document (canonical JSON, so zarr's formatting does not matter)."""
    return crc(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())


def commit_record(uid: str, rows: int, sequences: int) -> dict:
    return {"rows": rows, "sequences": sequences, "store": uid,
            "crc32c": crc(f"{uid}:{rows}:{sequences}".encode())}


def commit_problem(rec, uid: str | None) -> str | None:
    """What is wrong with a commit record (None: nothing). ``uid`` None: a store of a format
    without checksums (rows and sequences are still type-checked)."""
    if not isinstance(rec, dict):
        return f"commit record is {type(rec).__name__}, not an object"
    rows, seqs = rec.get("rows"), rec.get("sequences")
    if type(rows) is not int or type(seqs) is not int or rows < 0 or seqs < 0 or seqs > rows:
        return f"commit record rows={rows!r} sequences={seqs!r} is not a pair of counts"
    if uid is None:
        return None
    if rec.get("store") != uid:
        return (f"commit record belongs to store {rec.get('store')!r}, not this store ({uid}): this file or the "
                "store's own zarr.json is from another store")
    if rec.get("crc32c") != crc(f"{uid}:{rows}:{seqs}".encode()):
        return "commit record checksum mismatch"
    return None


def row_crcs(hidden: np.ndarray, next_token: np.ndarray, position: np.ndarray) -> tuple[int, int, int]:
    """crc32c of rows' bytes: hidden uint16, next_token and position int32, little-endian."""
    return (crc(np.ascontiguousarray(hidden, "<u2")), crc(np.ascontiguousarray(next_token, "<i4")),
            crc(np.ascontiguousarray(position, "<i4")))


def entry_crc(uid: str, seq: int, first_row: int, length: int, replica: int, prompt_id: str,
              rows: tuple[int, int, int]) -> int:
    head = struct.pack("<qqqiIII", int(seq), int(first_row), int(length), int(replica), *map(int, rows))
    return crc(uid.encode() + head + str(prompt_id).encode())


def bad_entries(uid: str, index: dict[str, np.ndarray]) -> list[int]:
    """Positions of index entries whose checksum does not match them."""
    c = index["crc"]
    return [k for k in range(len(c))
            if entry_crc(uid, index["seq"][k], index["first_row"][k], index["length"][k], index["replica"][k],
                         index["prompt_id"][k], c[k, :3]) != int(c[k, 3])]


class SequenceCheck:
    """Checks a writer group's rows against their sequences' checksums as they are read —
    in pieces, in any order, from any number of threads. ``spans`` splits a row range
    into per-sequence pieces, ``piece`` checksums one, ``settle`` checks it (or keeps it
    until the rest of its sequence has been read) and returns the problems found."""

    def __init__(self, where: str, index: dict[str, np.ndarray], width: int, rows_per_shard: int):
        self.where, self.rows_per_shard = where, rows_per_shard
        self.first, self.length = index["first_row"].astype(np.int64), index["length"].astype(np.int64)
        self.end = self.first + self.length
        self.seq, self.want = index["seq"], index["crc"][:, :3].astype(np.int64)
        self.row_bytes = (2 * width, 4, 4)
        self._pending: dict[int, dict[int, tuple]] = {}  # sequence → {first row of piece: (rows, crcs)}
        self._lock = threading.Lock()

    def spans(self, r0: int, r1: int) -> list[tuple[int, int, int]]:
        """(k, a, b): rows [a, b) of sequence k that lie in rows [r0, r1)."""
        k0 = int(np.searchsorted(self.end, r0, side="right"))
        k1 = int(np.searchsorted(self.first, r1, side="left"))
        return [(k, max(r0, int(self.first[k])), min(r1, int(self.end[k]))) for k in range(k0, k1)]

    @staticmethod
    def piece(cols: dict[str, np.ndarray], r0: int, a: int, b: int) -> tuple[int, int, int]:
        return tuple(crc(cols[c][a - r0:b - r0]) for c in ROW_COLUMNS)

    def settle(self, k: int, a: int, b: int, crcs: tuple, seq_col: np.ndarray | None = None) -> list[str]:
        problems = []
        if seq_col is not None and np.any(seq_col != self.seq[k]):
            problems.append(self._problem(k, "seq", a, b, "row sequence ids disagree with the index"))
        if b - a != int(self.length[k]):
            with self._lock:
                parts = self._pending.setdefault(k, {})
                parts[a] = (b - a, crcs)
                tiled = self._tile(k, parts)
                if tiled is None:
                    return problems
                del self._pending[k]
            crcs = tiled
        for c, got, want in zip(ROW_COLUMNS, crcs, self.want[k]):
            if got != int(want):
                problems.append(self._problem(k, c, int(self.first[k]), int(self.end[k]),
                                              "do not match their checksum in index/crc"))
        return problems

    def _tile(self, k: int, parts: dict) -> tuple | None:
        """The sequence's checksums once its pieces cover it from its first row to its last."""
        r, crcs = int(self.first[k]), None
        while r < int(self.end[k]):
            if r not in parts:
                return None
            n, c = parts[r]
            crcs = c if crcs is None else tuple(combine(x, y, n * w) for x, y, w in zip(crcs, c, self.row_bytes))
            r += n
        return crcs

    def _problem(self, k: int, col: str, a: int, b: int, what: str) -> str:
        shards = range(a // self.rows_per_shard, (b - 1) // self.rows_per_shard + 1)
        files = ", ".join(f"{col}/c/{s}" + ("/0" if col == "hidden" else "") for s in shards)
        return (f"{self.where}: sequence {int(self.seq[k])} (rows {a}–{b}): {col} rows {what} — "
                f"{files} or the index is damaged or from another store")

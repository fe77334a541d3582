"""Fixed row partitions of the capture stores, and the held-out split.

Every committed sequence of the stores, in store / writer / index order, is either
*calibration* or *held-out*: held-out are the sequences of a seeded random
``holdout`` fraction of the prompts (by prompt id, so the same prompt captured twice — two
capture points, two stores — never lands on both sides; a sequence without a prompt id is
its own prompt). Each split is then cut into contiguous partitions of whole sequences with
about equal rows. The partitions are a property of the job — stores, ``partitions``,
``holdout``, ``seed`` — never of the worker count: a partition is the unit a worker reads
and replays, and the one that reruns when a worker is lost. ``PartitionPlan.id`` hashes
the whole plan, so a worker asked to add partitions of another plan refuses.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

SPLITS = ("calibration", "heldout")
ROWS_PER_PARTITION = 65536   # default: one partition per this many calibration rows …
MAX_DEFAULT_PARTITIONS = 64  # … up to this many (each partition folds one full Hessian set)


@dataclass(frozen=True)
class Run:
    """Sequences k0 ≤ k < k1 of one writer group (contiguous rows in the store)."""
    store: int       # index into the plan's stores
    writer: str
    k0: int
    k1: int


@dataclass(frozen=True)
class Partition:
    split: str                 # calibration | heldout
    index: int                 # position within its split
    runs: tuple[Run, ...]
    rows: int
    sequences: int

    def reader_runs(self) -> list[tuple[int, str, int, int]]:
        return [(r.store, r.writer, r.k0, r.k1) for r in self.runs]


@dataclass(frozen=True)
class PartitionPlan:
    stores: tuple[str, ...]
    calibration: tuple[Partition, ...]
    heldout: tuple[Partition, ...]
    holdout: float
    seed: int
    prompts: dict            # split → number of prompts
    id: str                  # sha256 of everything above

    def parts(self, split: str) -> tuple[Partition, ...]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.calibration if split == "calibration" else self.heldout

    def rows(self, split: str) -> int:
        return sum(p.rows for p in self.parts(split))

    def describe(self) -> dict:
        """What the manifest records."""
        out = {"id": self.id, "holdout": self.holdout, "seed": self.seed}
        for split in SPLITS:
            parts = self.parts(split)
            out[split] = {"partitions": len(parts), "prompts": self.prompts[split],
                          "sequences": sum(p.sequences for p in parts), "rows": sum(p.rows for p in parts),
                          "rows_per_partition": [p.rows for p in parts]}
        return out


def default_partitions(rows: int) -> int:
    return max(1, min(MAX_DEFAULT_PARTITIONS, math.ceil(rows / ROWS_PER_PARTITION)))


def heldout_prompts(prompts: list[str], fraction: float, seed: int) -> set[str]:
    """round(fraction × n) prompts chosen by a seeded hash of each id (independent of order)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    unique = sorted(set(prompts))
    n = round(fraction * len(unique))
    if fraction > 0 and n == 0:
        raise ValueError(f"held-out fraction {fraction} of {len(unique)} prompt(s) holds none out; "
                         "capture more prompts or set the held-out fraction to 0")
    if n >= len(unique) and unique:
        raise ValueError(f"held-out fraction {fraction} of {len(unique)} prompt(s) leaves none for calibration")
    ranked = sorted(unique, key=lambda p: hashlib.sha256(f"{seed}\0{p}".encode()).hexdigest())
    return set(ranked[:n])


def _cut(seqs: list[tuple[int, str, int, int]], split: str, n: int) -> tuple[Partition, ...]:
    """``seqs`` (store, writer, k, rows) in order → n contiguous partitions of ~equal rows."""
    if n > len(seqs):
        raise ValueError(f"{n} {split} partitions but only {len(seqs)} {split} sequence(s); "
                         "each partition holds whole sequences — ask for fewer partitions")
    total = sum(r for *_, r in seqs)
    parts, start, acc = [], 0, 0
    for i in range(n):
        target = total * (i + 1) / n
        end = start + 1           # at least one sequence each, and leave one for each later partition
        acc += seqs[start][3]
        while end < len(seqs) - (n - 1 - i) and acc + seqs[end][3] / 2 <= target:
            acc += seqs[end][3]
            end += 1
        if i == n - 1:
            acc += sum(s[3] for s in seqs[end:])
            end = len(seqs)
        parts.append(_partition(seqs[start:end], split, i))
        start = end
    return tuple(parts)


def _partition(seqs: list[tuple[int, str, int, int]], split: str, index: int) -> Partition:
    runs: list[Run] = []
    for s, w, k, _ in seqs:
        if runs and runs[-1].store == s and runs[-1].writer == w and runs[-1].k1 == k:
            runs[-1] = Run(s, w, runs[-1].k0, k + 1)
        else:
            runs.append(Run(s, w, k, k + 1))
    return Partition(split, index, tuple(runs), sum(r for *_, r in seqs), len(seqs))


def plan_partitions(stores: list[str], partitions: int | None = None, holdout: float = 0.1,
                    seed: int = 0) -> PartitionPlan:
    """The partition plan of ``stores`` (module docstring). ``partitions``: calibration
    partitions (default: one per 65,536 rows, at most 64); the held-out sequences get
    partitions in proportion to their rows (at least one when there are any)."""
    from requant.storage import CaptureStore

    if partitions is not None and partitions < 1:
        raise ValueError(f"partitions must be ≥ 1, got {partitions}")
    seqs: list[tuple[int, str, int, int]] = []
    keys: list[str] = []
    for si, path in enumerate(stores):
        st = CaptureStore.open(str(path))
        for w in st.writer_names():
            idx = st.index(w)
            first, length = idx["first_row"], idx["length"]
            for k in range(len(length)):
                # a run needs contiguous rows; sequences always are, but say so if a store is odd
                if k and int(first[k]) != int(first[k - 1] + length[k - 1]):
                    raise ValueError(f"{st.group_path(w)}: sequence {k} does not start where sequence {k - 1} ends")
                seqs.append((si, w, k, int(length[k])))
                pid = str(idx["prompt_id"][k])
                keys.append(pid if pid else f"\0{si}/{w}/{int(idx['seq'][k])}")
    held = heldout_prompts(keys, holdout, seed)
    cal = [s for s, k in zip(seqs, keys) if k not in held]
    ho = [s for s, k in zip(seqs, keys) if k in held]
    if not cal:
        raise ValueError("no committed sequences to calibrate from")
    cal_rows, ho_rows = sum(s[3] for s in cal), sum(s[3] for s in ho)
    n_cal = partitions if partitions is not None else min(default_partitions(cal_rows), len(cal))
    n_ho = min(len(ho), max(1, round(n_cal * ho_rows / cal_rows))) if ho else 0
    calibration, heldout = _cut(cal, "calibration", n_cal), _cut(ho, "heldout", n_ho)
    prompts = {"calibration": len(set(keys) - held), "heldout": len(held)}
    body = {"stores": [str(s) for s in stores], "holdout": holdout, "seed": seed, "prompts": prompts,
            "calibration": [asdict(p) for p in calibration], "heldout": [asdict(p) for p in heldout]}
    ident = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return PartitionPlan(tuple(str(s) for s in stores), calibration, heldout, holdout, seed, prompts, ident)


def assign(parts: tuple[Partition, ...] | list[Partition], workers: int) -> list[list[int]]:
    """Partition indices per worker: contiguous ranges, balanced by rows (a worker reads
    neighbouring sequences). More workers than partitions leaves the last ones empty."""
    if workers < 1:
        raise ValueError(f"workers must be ≥ 1, got {workers}")
    out: list[list[int]] = [[] for _ in range(workers)]
    total = sum(p.rows for p in parts) or 1
    acc = 0
    for i, p in enumerate(parts):
        # the worker whose share of the rows this partition's midpoint falls in
        g = min(workers - 1, int(workers * (acc + p.rows / 2) / total))
        g = min(g, i)  # so that with W > P, workers 0 … P-1 get one each
        out[g].append(i)
        acc += p.rows
    return out

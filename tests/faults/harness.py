"""The fault-injection harness: damage kinds, running a command, judging its outcome, the
summary table.

Each case damages one file one way (seeded, so every run damages the same bytes); each
command run on it ends in one of

* ``error``  — it refused with a clear error: the message names the input and what is
  wrong (for the CLI: exit status ≠ 0, one ``requant: error:`` line or ``FAIL`` lines, no
  traceback); a quantize run leaves no output and no temp dir;
* ``same``   — it succeeded with exactly what it gives on the undamaged input (the damage
  is outside what it reads, or the design tolerates it: see the README's reliability notes);
* ``kept``   — (resume of a damaged writer group) it appended without reading the damaged
  file and ``verify`` still names the damage afterwards;
* ``WRONG`` / ``UNCLEAR`` — a silently different result, or an error that is a traceback or
  does not name the input: the suite fails on any.
"""
from __future__ import annotations

import contextlib
import io
import os
import random
import re
import shutil
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ACCEPTED = ("error", "same", "kept")


# -- damage ---------------------------------------------------------------------------------

def _rng(case: str) -> random.Random:
    return random.Random(zlib.crc32(case.encode()))


def flip(path: Path, other: Path | None, case: str) -> bool:
    """XOR one byte at a seeded position with a seeded non-zero mask."""
    data = bytearray(path.read_bytes())
    if not data:
        return False
    r = _rng(case)
    data[r.randrange(len(data))] ^= r.randrange(1, 256)
    path.write_bytes(bytes(data))
    return True


def truncate(path: Path, other: Path | None, case: str) -> bool:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return len(data) > 1


def empty(path: Path, other: Path | None, case: str) -> bool:
    path.write_bytes(b"")
    return True


def delete(path: Path, other: Path | None, case: str) -> bool:
    path.unlink()
    return True


def replace(path: Path, other: Path | None, case: str) -> bool:
    """The file of another store (or checkpoint) at the same place; n/a where that has no such
    file or the same bytes."""
    if other is None or not other.is_file() or other.read_bytes() == path.read_bytes():
        return False
    shutil.copyfile(other, path)
    return True


DAMAGES = {"flip": flip, "truncate": truncate, "empty": empty, "delete": delete, "replace": replace}


# -- running a command ------------------------------------------------------------------------

@dataclass
class Run:
    rc: int | None            # exit status (CLI), None for a Python call
    out: str = ""
    err: str = ""             # stderr, or the exception's message
    exc: BaseException | None = None
    value: object = None


def cli(*argv: str) -> Run:
    """``requant ARGV`` in this process (the console script's own ``main``)."""
    from requant.orchestrator.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(argv))
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # noqa: BLE001 — a traceback the user would see
            return Run(rc=None, out=out.getvalue(), err=f"Traceback: {type(e).__name__}: {e}", exc=e)
    return Run(rc=rc, out=out.getvalue(), err=err.getvalue())


def call(fn, expected: tuple = ()) -> Run:
    """A Python API call; ``expected``: the exception types a caller is promised."""
    try:
        return Run(rc=None, value=fn())
    except expected as e:
        return Run(rc=None, err=str(e), exc=e)
    except BaseException as e:  # noqa: BLE001
        return Run(rc=None, err=f"Traceback: {type(e).__name__}: {e}", exc=e)


_CLI_LINE = re.compile(r"^(requant: error: |FAIL |\d+ problem\(s\) in |requant: ledger )")


def clear_error(run: Run, names: tuple[str, ...], hints: tuple[str, ...]) -> tuple[bool, str]:
    """The error names the input (one of ``names``: a path) and the damaged part (one of ``hints``)."""
    msg = run.err.strip()
    if not msg or "Traceback" in msg:
        return False, msg[-300:] or "no message"
    if run.rc is not None and not all(_CLI_LINE.match(line) for line in msg.splitlines()):
        return False, f"not a one-line error: {msg[-300:]}"
    if not any(n in msg for n in names):
        return False, f"does not name the input: {msg[:300]}"
    if hints and not any(h in msg for h in hints):
        return False, f"does not name the damaged part ({'/'.join(hints)}): {msg[:300]}"
    return True, msg.splitlines()[0][:240]


def no_partial_output(out: Path) -> tuple[bool, str]:
    if out.exists():
        return False, f"{out} exists after a failed run"
    left = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]
    return (not left), (f"temp dirs left: {left}" if left else "")


# -- results ----------------------------------------------------------------------------------

@dataclass
class Matrix:
    """Outcomes by (file kind, damage) and command; the summary and its failures."""
    title: str
    rows: dict = field(default_factory=lambda: defaultdict(dict))   # (kind, damage) → {command: (outcome, note)}
    na: list = field(default_factory=list)
    seconds: Counter = field(default_factory=Counter)               # command → wall seconds, all cases

    def add(self, kind: str, damage: str, command: str, outcome: str, note: str = "") -> None:
        self.rows[(kind, damage)][command] = (outcome, note)

    def failures(self) -> list[str]:
        return [f"{k} / {d} / {c}: {o} — {n}" for (k, d), cmds in self.rows.items()
                for c, (o, n) in cmds.items() if o not in ACCEPTED]

    def counts(self) -> dict:
        by_damage = defaultdict(Counter)
        for (k, d), cmds in self.rows.items():
            by_damage[d]["cases"] += 1
            for c, (o, _) in cmds.items():
                by_damage[d][o] += 1
        return by_damage

    def table(self) -> str:
        commands = sorted({c for cmds in self.rows.values() for c in cmds}, key=_order)
        lines = [f"== {self.title}: {len(self.rows)} cases ({len(self.na)} n/a), "
                 f"{sum(len(c) for c in self.rows.values())} command runs"]
        w = max([len(k) for k, _ in self.rows] + [10])
        lines.append(f"{'file':{w}s} {'damage':9s} " + " ".join(f"{c:>13s}" for c in commands))
        for (k, d), cmds in self.rows.items():
            lines.append(f"{k:{w}s} {d:9s} " + " ".join(f"{cmds.get(c, ('—', ''))[0]:>13s}" for c in commands))
        lines.append("by damage kind:")
        for d, c in self.counts().items():
            lines.append(f"  {d:9s} {c['cases']:3d} cases: " + ", ".join(f"{o} {c[o]}" for o in
                                                                          ACCEPTED + ("WRONG", "UNCLEAR") if c[o]))
        tot = Counter()
        for c in self.counts().values():
            tot.update(c)
        lines.append(f"  total     {tot['cases']:3d} cases: " + ", ".join(f"{o} {tot[o]}" for o in
                                                                          ACCEPTED + ("WRONG", "UNCLEAR") if tot[o]))
        if env_flag("REQUANT_FAULTS_VERBOSE"):  # every outcome's note: the first line of each error
            lines += [f"  {k} / {d} / {c}: {o}: {n}" for (k, d), cmds in self.rows.items()
                      for c, (o, n) in cmds.items() if n]
        if self.seconds:
            lines.append("seconds: " + ", ".join(f"{c} {t:.1f}" for c, t in self.seconds.most_common()))
        return "\n".join(lines)


def _order(c: str) -> int:
    known = ["info", "verify", "read", "quantize", "resume-job", "resume-writer"]
    return known.index(c) if c in known else len(known)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")

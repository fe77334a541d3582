"""Every kind of file a capture store holds, damaged one at a time five ways (a flipped byte,
cut in half, emptied, deleted, replaced by another store's file), and every command that
reads stores run on each: ``requant store info``, ``requant store verify``, the reader,
``requant quantize``, a resumed capture job (its start-up reconcile of ledger and store,
then a new writer group, as a replica opens one) and a writer resuming the damaged group.
Each run must end in a clear error or in exactly the undamaged result (harness.py); verify
must name every damage to what the store holds. The table prints with ``-s``."""
from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from requant.orchestrator.ledger import Ledger, StoreIndex, ledger_path
from requant.storage import CaptureStore, StoreError, StoreMeta, StoreReader
from requant.storage.schema import DamagedInputError
from requant.testing.stores import META, append

from .conftest import SHARD
from .harness import DAMAGES, Matrix, call, clear_error, cli, no_partial_output

LEDGER = "<ledger>"


@dataclass(frozen=True)
class Kind:
    label: str
    rel: str                  # path in the store (LEDGER: the job's ledger beside it)
    hints: tuple[str, ...]    # an error must name one of these
    role: str                 # content: verify names every damage · meta: named, or the meaning is unchanged ·
    #                           tail: past the commit, not part of the store · ledger: rebuilt from the store


KINDS = [
    Kind("store metadata", "zarr.json", ("zarr.json",), "content"),
    Kind("writers group metadata", "writers/zarr.json", ("writers",), "meta"),
    Kind("group metadata + commit", "writers/w0/zarr.json", ("w0",), "content"),
    Kind("hidden array metadata", "writers/w0/hidden/zarr.json", ("hidden",), "meta"),
    Kind("index group metadata", "writers/w0/index/zarr.json", ("index",), "meta"),
    Kind("index array metadata", "writers/w0/index/prompt_id/zarr.json", ("prompt_id", "index"), "meta"),
    Kind("checksum array metadata", "writers/w0/index/crc/zarr.json", ("crc", "index"), "meta"),
    Kind("hidden shard", "writers/w0/hidden/c/0/0", ("hidden",), "content"),
    Kind("hidden shard, last committed", "writers/w0/hidden/c/2/0", ("hidden",), "content"),
    Kind("next_token shard", "writers/w0/next_token/c/1", ("next_token",), "content"),
    Kind("index chunk (prompt ids)", "writers/w0/index/prompt_id/c/0", ("index",), "content"),
    Kind("index chunk (lengths)", "writers/w0/index/length/c/1", ("index",), "content"),
    Kind("index checksum chunk", "writers/w0/index/crc/c/0/0", ("index",), "content"),
    Kind("hidden shard of group 2", "writers/w1/hidden/c/0/0", ("hidden",), "content"),
    Kind("uncommitted tail shard", "writers/w0/hidden/c/3/0", ("hidden",), "tail"),
    Kind("ledger", LEDGER, ("ledger",), "ledger"),
]
STORE_ERRORS = (StoreError, DamagedInputError, OSError, ValueError)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _digest(reader_iter) -> str:
    h = hashlib.sha256()
    for s in reader_iter:
        for part in (s.writer, str(s.seq), s.prompt_id, str(s.replica)):
            h.update(part.encode() + b"\0")
        for a in (s.hidden, s.next_token, s.position):
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def read_all(path: str) -> str:
    """What a consumer gets: every sequence, and the rows again in batches that cut sequences."""
    with StoreReader(path) as r:
        seqs = _digest(r.sequences())
        h = hashlib.sha256(seqs.encode())
        for b in r.batches(max_rows=100):
            h.update(b.hidden.tobytes() + b.next_token.tobytes() + b.position.tobytes() + b.seq.tobytes())
    return h.hexdigest()


def _info_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if not line.startswith(("store ", "bytes "))]


def _w0(path: str) -> str:
    with StoreReader(path, writers=["w0"]) as r:
        return _digest(r.sequences())


def _resume_job(path: str) -> tuple[set, dict]:
    """A capture job's start on this store (orchestrator/job.py): reconcile the ledger with the
    store, then a replica's writer group opened the way the capture plugin opens it."""
    led = Ledger(ledger_path(path))
    try:
        recon = led.reconcile(StoreIndex(path))
        done = set(led.done)
    finally:
        led.close()
    store = CaptureStore.create(path, StoreMeta(**META), exist_ok=True)
    rng = np.random.default_rng(7)
    with store.writer("replica0-resumed", durable=False) as w:  # (fsyncs change no outcome here, only time)
        append(w, rng, 0, 11, 400, "resumed-0")
    return done, recon


def _resume_writer(path: str) -> None:
    with CaptureStore.open(path, mode="r+").writer("w0", durable=False) as w:
        append(w, np.random.default_rng(8), 999, 13, 400, "resumed-w0")


@pytest.fixture(scope="module")
def reference(stores, quantized, tmp_path_factory):
    """What every command gives on the undamaged store."""
    d = tmp_path_factory.mktemp("fault-ref-store")
    a = str(stores["a"])
    info = cli("store", "info", a)
    assert info.rc == 0, info.err
    # w0 after a resumed writer appended one sequence to an undamaged copy
    shutil.copytree(stores["a"], d / "a")
    _resume_writer(str(d / "a"))
    return {"info": _info_lines(info.out), "read": read_all(a), "done": stores["a_prompts"],
            "shard": quantized["shard"], "w0_resumed": _w0(str(d / "a"))}


def _case_dir(base: Path, stores: dict) -> Path:
    shutil.copytree(stores["a"], base / "a")
    shutil.copyfile(ledger_path(str(stores["a"])), ledger_path(str(base / "a")))
    return base / "a"


def _target(store: Path, kind: Kind) -> Path:
    return ledger_path(str(store)) if kind.rel == LEDGER else store / kind.rel


def _error(run, store: Path, hints: tuple[str, ...]) -> tuple[str, str]:
    ok, note = clear_error(run, (str(store),), hints)
    return ("error" if ok else "UNCLEAR"), note


def _same(equal: bool, note: str = "") -> tuple[str, str]:
    return ("same", "") if equal else ("WRONG", note)


def do_info(store: Path, kind: Kind, ref: dict, ckpt: dict) -> tuple[str, str]:
    r = cli("store", "info", str(store))
    return _same(_info_lines(r.out) == ref["info"], r.out[-200:]) if r.rc == 0 else _error(r, store, kind.hints)


def do_verify(store: Path, kind: Kind, ref: dict, ckpt: dict) -> tuple[str, str]:
    r = cli("store", "verify", str(store))
    if r.rc != 0:
        return _error(r, store, kind.hints)
    rows = call(lambda: read_all(str(store)), STORE_ERRORS)
    return _same(rows.value == ref["read"], f"verify passed but the rows differ: {rows.err[:200]}")


def do_read(store: Path, kind: Kind, ref: dict, ckpt: dict) -> tuple[str, str]:
    r = call(lambda: read_all(str(store)), STORE_ERRORS)
    return _same(r.value == ref["read"], "rows differ") if r.exc is None else _error(r, store, kind.hints)


def do_quantize(store: Path, kind: Kind, ref: dict, ckpt: dict) -> tuple[str, str]:
    out = store.parent / "q-out"
    r = cli("quantize", "--store", str(store), "--master", str(ckpt["master"]), "--base", str(ckpt["base"]),
            "--out", str(out), "--no-ray", "--quiet", "--device", "cpu")
    if r.rc == 0:
        return _same(_sha(out / SHARD) == ref["shard"], "shard differs")
    clean, why = no_partial_output(out)
    return _error(r, store, kind.hints) if clean else ("WRONG", why)


def do_resume_job(store: Path, kind: Kind, ref: dict, ckpt: dict) -> tuple[str, str]:
    r = call(lambda: _resume_job(str(store)), STORE_ERRORS)
    if r.exc is not None:
        return _error(r, store, kind.hints + ("ledger",))
    done, recon = r.value
    return _same(done == ref["done"], f"ledger says {len(done)} prompts done, the store holds {len(ref['done'])}")


def do_resume_writer(store: Path, kind: Kind, ref: dict, ckpt: dict) -> tuple[str, str]:
    r = call(lambda: _resume_writer(str(store)), STORE_ERRORS)
    if r.exc is not None:
        return _error(r, store, kind.hints)
    if call(lambda: _w0(str(store)), STORE_ERRORS).value == ref["w0_resumed"]:
        return "same", ""
    if CaptureStore.open(str(store)).verify():  # appended without reading it; the damage stays named
        return "kept", ""
    return "WRONG", "the damage is gone from verify's view"


COMMANDS = {"info": do_info, "verify": do_verify, "read": do_read, "quantize": do_quantize,
            "resume-job": do_resume_job, "resume-writer": do_resume_writer}


def run_case(m: Matrix, kind: Kind, damage: str, store: Path, ref: dict, ckpt: dict) -> None:
    # The ledger is an input of the capture job only: no other command opens it.
    for name in ["resume-job"] if kind.role == "ledger" else COMMANDS:
        t0 = time.perf_counter()
        m.add(kind.label, damage, name, *COMMANDS[name](store, kind, ref, ckpt))
        m.seconds[name] += time.perf_counter() - t0


def test_every_store_file_damaged_every_way(stores, checkpoint, reference, tmp_path):
    m = Matrix("capture store faults")
    for kind in KINDS:
        for damage, fn in DAMAGES.items():
            case = f"{kind.rel}:{damage}"
            base = tmp_path / f"{len(m.rows) + len(m.na):03d}"
            base.mkdir()
            store = _case_dir(base, stores)
            other = ledger_path(str(stores["b"])) if kind.rel == LEDGER else stores["b"] / kind.rel
            if not fn(_target(store, kind), other, case):
                m.na.append(case)
                continue
            run_case(m, kind, damage, store, reference, checkpoint)  # (case dirs go with pytest's tmp dirs)
    print("\n" + m.table())
    assert not m.failures(), "\n".join(m.failures())
    # verify names every damage to what the store holds; tail and ledger damage changes nothing
    for (label, damage), cmds in m.rows.items():
        role = next(k.role for k in KINDS if k.label == label)
        outcomes = {o for o, _ in cmds.values()}
        if role == "content":
            assert cmds["verify"][0] == "error", (label, damage, cmds["verify"])
        elif role in ("tail", "ledger"):
            assert outcomes <= {"same"}, (label, damage, cmds)
        elif cmds["verify"][0] == "same":  # meta: unchanged meaning is the only way to pass verify
            assert outcomes <= {"same", "kept"}, (label, damage, cmds)

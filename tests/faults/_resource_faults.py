"""Resource faults on real file systems, run in a private mount namespace (``unshare --mount``,
started by test_resource_faults.py): small tmpfs mounts that fill up (the kernel's own ENOSPC)
and read-only bind mounts (EROFS). Prints one JSON object: scenario → facts the test asserts.

    unshare --mount --propagation private python _resource_faults.py WORKDIR MASTER BASE STORE
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from requant.capture import Capturer
from requant.orchestrator.ledger import Ledger
from requant.storage import CaptureStore, Layout, StoreError, StoreMeta, StoreReader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.faults.harness import cli  # noqa: E402

W = 2048  # rows of the tiny DSV4: 4 × 512
LAYOUT = Layout(rows_per_chunk=16, chunks_per_shard=2)


def mount_tmpfs(d: Path, size: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], check=True)
    return d


def mount_readonly(src: Path, at: Path) -> Path:
    at.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(src), str(at)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(at)], check=True)
    return at


def fill(d: Path) -> Path:
    """Write zeros into ``d`` until the file system is full (the kernel says ENOSPC)."""
    ballast = d / "ballast"
    with open(ballast, "wb", buffering=0) as f:  # unbuffered: nothing left to flush at close
        try:
            while True:
                f.write(bytes(1 << 16))
        except OSError:
            pass
    return ballast


def sequence(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(i)
    t = 20 + i % 7
    return rng.integers(0, 65536, (t, W), dtype=np.uint16), rng.integers(0, 400, t), np.arange(t)


def digest(store: str) -> list:
    return [(s.seq, s.prompt_id, s.hidden.tobytes(), s.next_token.tobytes()) for s in StoreReader(store).sequences()]


def expected(n: int) -> list:
    return [(i, f"p{i}", sequence(i)[0].tobytes(), sequence(i)[1].astype(np.int32).tobytes()) for i in range(n)]


def capture_disk_full(work: Path) -> dict:
    """A writer on a 1 MiB file system: it fails with ENOSPC, committed rows stay whole and
    readable, and once space is freed a new writer resumes after the last commit."""
    fs = mount_tmpfs(work / "cap-fs", "1m")
    store = CaptureStore.create(str(fs / "cap"), StoreMeta(hidden_size=512, hc_mult=4), LAYOUT)
    spare = fs / "spare"
    spare.write_bytes(bytes(256 << 10))  # freed after the failure: room to resume
    error, appended = "", 0
    w = store.writer("w0", flush_rows=16)
    try:
        for i in range(1000):
            w.append_sequence(i, *sequence(i), prompt_id=f"p{i}")
            w.flush()
            appended += 1
    except StoreError as e:
        error = str(e)
    try:
        w.close()
    except StoreError:
        pass
    committed = CaptureStore.open(store.path).committed("w0")
    problems = CaptureStore.open(store.path).verify()
    intact = digest(store.path) == expected(committed[1])
    spare.unlink()
    with CaptureStore.open(store.path, mode="r+").writer("w0") as w2:  # resumes after the last commit
        n0 = w2.stats.sequences
        for i in range(n0, n0 + 2):
            w2.append_sequence(i, *sequence(i), prompt_id=f"p{i}")
    resumed = digest(store.path) == expected(n0 + 2)
    partial = [str(p) for p in Path(store.path).rglob("*.partial")]
    return {"error": error, "appended": appended, "committed": committed, "problems": problems, "intact": intact,
            "resumed_from": n0, "resumed_ok": resumed and CaptureStore.open(store.path).verify() == [],
            "partial_left": partial}


def capturer_disk_full(work: Path) -> dict:
    """The capture pipeline behind a server's hooks on a full disk: the hook's next call raises
    (the server stops capturing) and the committed sequences stay readable."""
    fs = mount_tmpfs(work / "hook-fs", "512k")
    store = CaptureStore.create(str(fs / "cap"), StoreMeta(hidden_size=512, hc_mult=4), LAYOUT)
    cap = Capturer(store.writer("w0", flush_rows=16), width=W, rows_per_step=64, slots=2, idle_commit_s=0.05)
    error = ""
    try:
        for i in range(1000):
            h, _, _ = sequence(i)
            t = h.shape[0]
            tokens = list(range(1, t + 2))
            hidden = torch.from_numpy(h.view(np.int16)).view(torch.bfloat16)
            cap.add_step([f"r{i}"], [t], hidden, torch.tensor(tokens[:t]), torch.arange(t))
            cap.finish(f"r{i}", tokens, prompt_id=f"p{i}")
            cap.flush()
    except RuntimeError as e:
        error = str(e)
    try:
        cap.close()
    except (RuntimeError, StoreError):
        pass
    s = CaptureStore.open(store.path)
    rows, seqs = s.committed("w0")
    return {"error": error, "committed": [rows, seqs], "problems": s.verify(),
            "readable": len(list(StoreReader(store.path).sequences())) == seqs}


def ledger_disk_full(work: Path) -> dict:
    fs = mount_tmpfs(work / "ledger-fs", "64k")
    led = Ledger(fs / "cap.ledger.jsonl")
    fill(fs)
    try:
        led.mark_done([f"prompt-{i}" for i in range(200)])
        return {"error": ""}
    except OSError as e:
        return {"error": str(e)}


def _quantize(store: str, master: str, base: str, out: Path) -> dict:
    r = cli("quantize", "--store", store, "--master", master, "--base", base, "--out", str(out), "--no-ray",
            "--quiet", "--device", "cpu")
    left = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]
    return {"rc": r.rc, "err": r.err.strip(), "out_exists": out.exists(), "temp_left": left}


def assembly_disk_full(work: Path, master: str, base: str, store: str) -> dict:
    """The output's file system fills while the checkpoint is assembled."""
    fs = mount_tmpfs(work / "out-fs", "2m")
    res = _quantize(store, master, base, fs / "out")
    res["fs_left"] = sorted(p.name for p in fs.iterdir())
    return res


def manifest_disk_full(work: Path, master: str, base: str, store: str) -> dict:
    """The disk fills just before the manifest is written (the last file, after the shard,
    the base shards, config, index and report)."""
    import requant.quantizer.stage.run as stage

    fs = mount_tmpfs(work / "manifest-fs", "256m")
    report = stage.write_report
    seen = {}

    def report_then_fill(tmp, manifest, min_tokens):
        path = report(tmp, manifest, min_tokens)
        seen["ballast"] = fill(fs)
        return path

    stage.write_report = report_then_fill
    try:
        res = _quantize(store, master, base, fs / "out")
    finally:
        stage.write_report = report
    res["filled"] = "ballast" in seen
    seen.get("ballast", fs / "none").unlink(missing_ok=True)
    res["fs_left"] = sorted(p.name for p in fs.iterdir())
    return res


def readonly(work: Path, master: str, base: str, store: str) -> dict:
    """A store on a read-only mount: info, verify and the reader work; a writer, a ledger and a
    quantize output there are refused with the path."""
    ro = mount_readonly(Path(store).parent, work / "ro")
    ro_store = str(ro / Path(store).name)
    info, verify = cli("store", "info", ro_store), cli("store", "verify", ro_store)
    res = {"info_rc": info.rc, "verify_rc": verify.rc, "verify_out": verify.out.strip(),
           "read_rows": sum(len(s.next_token) for s in StoreReader(ro_store).sequences())}
    try:
        CaptureStore.open(ro_store, mode="r+").writer("w9")
        res["writer_error"] = ""
    except (OSError, StoreError) as e:
        res["writer_error"] = str(e)
    try:
        Ledger(ro / "new.ledger.jsonl")
        res["ledger_error"] = ""
    except OSError as e:
        res["ledger_error"] = str(e)
    res["quantize"] = _quantize(store, master, base, ro / "out")
    return res


def main(work: str, master: str, base: str, store: str) -> None:
    work = Path(work)
    out = {"capture_disk_full": capture_disk_full(work), "capturer_disk_full": capturer_disk_full(work),
           "ledger_disk_full": ledger_disk_full(work), "readonly": readonly(work, master, base, store),
           "assembly_disk_full": assembly_disk_full(work, master, base, store),
           "manifest_disk_full": manifest_disk_full(work, master, base, store)}
    for d in work.iterdir():  # the mounts go with the namespace; keep the work dir clean for pytest
        subprocess.run(["umount", str(d)], capture_output=True)
    shutil.rmtree(work / "ro", ignore_errors=True)
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    os.environ.setdefault("REQUANT_DEBUG", "")
    main(*sys.argv[1:5])

"""Disks that fill up and paths that cannot be written, on real file systems: small tmpfs
mounts and read-only bind mounts in a private mount namespace (_resource_faults.py).

* capture: a writer on a full disk stops with a clear error naming its group and ENOSPC; every
  committed sequence stays whole and readable, verify finds nothing wrong, and once there is
  room again a writer resumes after the last commit; the capture pipeline behind a server's
  hooks stops the same way (its next call raises); the job's ledger says which file it could
  not append to;
* quantize: the output's file system fills during assembly, or just before the manifest —
  a clear error, no output directory, no temp dir, nothing left on that file system;
* read-only: a store on a read-only mount verifies, reads and reports; a writer or ledger
  there, or an output directory under it, is refused with the path."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("_resource_faults.py")


def _namespace_ok() -> bool:
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    return r.returncode == 0


@pytest.fixture(scope="module")
def facts(stores, checkpoint, tmp_path_factory):
    if not _namespace_ok():
        pytest.skip("needs a private mount namespace (unshare --mount: root, or user namespaces with mount rights)")
    work = tmp_path_factory.mktemp("fault-resources")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, str(SCRIPT), str(work),
                        str(checkpoint["master"]), str(checkpoint["base"]), str(stores["a"])],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _no_space(msg: str) -> bool:
    return "No space left on device" in msg


def test_capture_stops_cleanly_on_a_full_disk_and_resumes(facts):
    f = facts["capture_disk_full"]
    assert "writers/w0" in f["error"] and _no_space(f["error"]), f["error"]
    rows, seqs = f["committed"]
    assert seqs >= 1 and seqs in (f["appended"], f["appended"] + 1), f  # the failed batch is not committed
    assert f["problems"] == [] and f["intact"], f
    assert f["resumed_from"] == seqs and f["resumed_ok"] and f["partial_left"] == [], f


def test_capture_pipeline_stops_the_hooks_on_a_full_disk(facts):
    f = facts["capturer_disk_full"]
    assert f["error"].startswith("requant capture failed:") and _no_space(f["error"]), f["error"]
    assert f["committed"][1] >= 1 and f["problems"] == [] and f["readable"], f


def test_ledger_on_a_full_disk_names_the_file(facts):
    err = facts["ledger_disk_full"]["error"]
    assert "cap.ledger.jsonl: cannot append to the capture ledger" in err and _no_space(err), err


@pytest.mark.parametrize("scenario", ["assembly_disk_full", "manifest_disk_full"])
def test_quantize_on_a_full_disk_publishes_nothing(facts, scenario):
    f = facts[scenario]
    assert f.get("filled", True), f
    assert f["rc"] == 2 and f["err"].startswith("requant: error:") and len(f["err"].splitlines()) == 1, f
    assert "writing the output failed" in f["err"] and _no_space(f["err"]) and "nothing was published" in f["err"], f
    assert not f["out_exists"] and f["temp_left"] == [] and f["fs_left"] == [], f


def test_readonly_store_verifies_and_unwritable_paths_are_refused(facts):
    f = facts["readonly"]
    assert f["info_rc"] == 0 and f["verify_rc"] == 0 and f["verify_out"].startswith("OK "), f
    assert f["read_rows"] == 309 + 117, f  # both groups' committed rows
    assert "Read-only file system" in f["writer_error"] and "/ro/a/writers/w9" in f["writer_error"], f
    assert "Read-only file system" in f["ledger_error"] and "new.ledger.jsonl" in f["ledger_error"], f
    q = f["quantize"]
    assert q["rc"] == 2 and "is not writable" in q["err"] and not q["out_exists"], q

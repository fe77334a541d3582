"""The capture pipeline's status file (what a drain waits on): busy from the moment a hook
hands it rows until they are committed, idle only once the store holds them, and a commit
that comes late (the REQUANT_TEST_COMMIT_DELAY_S hook: a slow store) keeps it busy, beating,
with the store still empty."""
import time

import torch

from requant.capture import Capturer, PipelineStatus, read_status
from requant.storage import CaptureStore, StoreMeta

W = 8


def _step(cap, req, n):
    cap.add_step([req], [n], torch.ones(n, W, dtype=torch.bfloat16), torch.arange(1, n + 1), torch.arange(n))


def _wait(pred, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError("timed out")


def _committed(store):
    return CaptureStore.open(store).committed("w")[1]


def test_busy_from_the_hooks_call_until_committed(tmp_path):
    store, path = str(tmp_path / "cap"), str(tmp_path / "status.json")
    w = CaptureStore.create(store, StoreMeta(hidden_size=W)).writer("w")
    # a commit 60 s late: nothing but close (which commits at once) makes the rows visible
    cap = Capturer(w, width=W, rows_per_step=8, idle_commit_s=0.05,
                   status=PipelineStatus(path).publisher("p"), test_commit_delay_s=60)
    st = read_status(path)
    assert st["idle"] and st["points"]["p"]["committed_sequences"] == 0
    _step(cap, "a", 3)
    assert not read_status(path)["idle"]  # shown busy before add_step returned
    cap.finish("a", [1, 2, 3, 4])
    st = _wait(lambda: (s := read_status(path))["points"]["p"]["uncommitted_sequences"] == 1 and s)
    assert not st["idle"] and st["points"]["p"]["pending_rows"] == 3 and _committed(store) == 0
    beat = st["beat"]
    _wait(lambda: read_status(path)["beat"] > beat)  # the writer thread beats while it holds the commit back
    assert not read_status(path)["idle"] and _committed(store) == 0
    cap.close()
    st = read_status(path)
    assert st["idle"] and st["points"]["p"]["committed_sequences"] == 1 == _committed(store)


def test_idle_only_once_the_store_holds_the_rows(tmp_path):
    store, path = str(tmp_path / "cap"), str(tmp_path / "status.json")
    w = CaptureStore.create(store, StoreMeta(hidden_size=W)).writer("w")
    cap = Capturer(w, width=W, rows_per_step=8, idle_commit_s=0.05, status=PipelineStatus(path).publisher("p"),
                   test_commit_delay_s=0.5)
    for i in range(3):
        _step(cap, f"r{i}", 2)
        cap.finish(f"r{i}", [1, 2, 3])
    _step(cap, "open", 2)  # a request still running: its rows are pending too
    seen = []

    def idle():
        st = read_status(path)
        seen.append((st["idle"], st["points"]["p"]["committed_sequences"], _committed(store)))
        return st["idle"]
    _wait(lambda: read_status(path)["points"]["p"]["committed_sequences"] == 3)
    assert not read_status(path)["idle"] and read_status(path)["points"]["p"]["open_requests"] == 1
    cap.finish("open", [1, 2, 3])
    _wait(idle)
    # whenever it said idle, the store already held what it counted as committed
    assert all(c <= stored for shown_idle, c, stored in seen if shown_idle)
    assert seen[-1][1:] == (4, 4)
    cap.close()


def test_a_failed_writer_says_so(tmp_path):
    class Broken:
        def append_sequence(self, *a, **k):
            raise OSError(28, "No space left on device")

        def flush(self):
            pass

        def close(self):
            pass

    path = str(tmp_path / "status.json")
    cap = Capturer(Broken(), width=W, rows_per_step=8, status=PipelineStatus(path).publisher("p"))
    _step(cap, "a", 2)
    cap.finish("a", [1, 2, 3])
    st = _wait(lambda: (s := read_status(path))["points"]["p"]["error"] and s)
    assert not st["idle"] and "No space left on device" in st["points"]["p"]["error"]

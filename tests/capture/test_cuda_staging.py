"""The CUDA path of capture's staging (device → pinned host, non_blocking, event-synced):
rows arrive bit-exact although each copy is queued behind long GPU work (the hook returns
before the copy lands) and the device buffer is overwritten right after. Runs where a CUDA
device exists (the GPU machine has no zarr, so the sink is an in-memory list; the store
itself is tested on CPU)."""
import numpy as np
import pytest
import torch

from requant.capture import Capturer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class ListSink:
    """In-memory sink (stand-in for the store writer where zarr is not installed)."""

    def __init__(self):
        self.seqs = []

    def append_sequence(self, seq_id, hidden, next_token, position, prompt_id="", replica=0):
        self.seqs.append((prompt_id, np.array(hidden), np.array(next_token), np.array(position)))

    def flush(self):
        pass

    def close(self):
        pass


def _activations(step, t, w):
    g = torch.Generator(device="cuda").manual_seed(step)
    return torch.randn(t, w, device="cuda", generator=g).to(torch.bfloat16)


def test_rows_survive_async_copies_and_buffer_reuse():
    t, w, steps = 1024, 4096, 12
    sink = ListSink()
    cap = Capturer(sink, width=w, rows_per_step=t, slots=2, batch_s=0)  # no batching delay: read ASAP
    buf = torch.empty(t, w, device="cuda", dtype=torch.bfloat16)
    ids = torch.arange(t, device="cuda")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for s in range(steps):
        for _ in range(8):  # tens of ms of GPU work ahead of the copy
            a = (a @ a).clamp_(-1, 1)
        buf.copy_(_activations(s, t, w))
        cap.add_step([f"r{s}"], [t], buf, ids, ids)  # returns while the GPU is still busy
        buf.fill_(float("nan"))  # the next forward reuses the buffer
        cap.finish(f"r{s}", list(range(t + 1)))
    cap.close()
    assert cap.staging.pin and cap.stats.sequences == steps and cap.stats.dropped_sequences == 0
    for s, (pid, hidden, nt, pos) in enumerate(sink.seqs):
        want = _activations(s, t, w).view(torch.int16).cpu().numpy().view(np.uint16)
        assert pid == f"r{s}" and np.array_equal(hidden, want) and pos.tolist() == list(range(t))


def test_side_stream_copy_of_fresh_tensors_survives_memory_reuse():
    """fresh=True: the copy runs on a side stream; the tensor is freed right after the hook
    and its memory handed to the next allocations (filled with NaN) — record_stream must
    keep the allocator off it until the copy has run."""
    t, w, steps = 1024, 4096, 12
    sink = ListSink()
    cap = Capturer(sink, width=w, rows_per_step=t, slots=2, batch_s=0)
    ids = torch.arange(t, device="cuda")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for s in range(steps):
        rows = _activations(s, t, w)
        for _ in range(8):  # GPU work queued on the main stream after the rows are produced
            a = (a @ a).clamp_(-1, 1)
        cap.add_step([f"r{s}"], [t], rows, ids, ids, fresh=True)
        del rows
        junk = [torch.full((t, w), float("nan"), device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        del junk
        cap.finish(f"r{s}", list(range(t + 1)))
    cap.close()
    assert cap.stats.sequences == steps and cap.stats.dropped_sequences == 0
    for s, (pid, hidden, nt, pos) in enumerate(sink.seqs):
        want = _activations(s, t, w).view(torch.int16).cpu().numpy().view(np.uint16)
        assert np.array_equal(hidden, want), s

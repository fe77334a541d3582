"""requant.capture with the real storage writer: rows of batched steps become whole
sequences in position order; recomputed positions keep their last row; rows computed from
tokens that did not survive are never written; incomplete requests are counted, not
silently lost; a slow writer shows up as back-pressure, with no rows lost."""
import time

import numpy as np
import pytest
import torch

from requant.capture import Capturer, IncompleteSequence, SequenceAssembler, open_capturer
from requant.storage import CaptureStore, StoreMeta, StoreReader

W = 8


def _rows(positions, salt=0.0):
    """bf16 rows that encode their position (and a salt) so mix-ups are visible."""
    p = torch.tensor(positions, dtype=torch.float32)
    return (p[:, None] * 10 + torch.arange(W) + salt).to(torch.bfloat16)


def _store(tmp_path):
    return CaptureStore.create(str(tmp_path / "cap"), StoreMeta(hidden_size=W))


def test_assembler_last_write_wins_and_tokens_are_checked():
    a = SequenceAssembler()
    tokens = [5, 6, 7, 8, 9]
    bits = lambda t: t.view(torch.int16).numpy().view(np.uint16)  # noqa: E731
    a.add("r", np.array([0, 1, 2]), np.array([5, 6, 7]), bits(_rows([0, 1, 2])))
    a.add("r", np.array([3]), np.array([99]), bits(_rows([3], salt=1)))   # a rejected draft at 3
    a.add("r", np.array([3]), np.array([8]), bits(_rows([3])))            # recomputed with the real token
    a.add("r", np.array([4]), np.array([9]), bits(_rows([4])))            # past the end: never fed back
    seq = a.finish("r", tokens)
    assert seq.position.tolist() == [0, 1, 2, 3] and seq.next_token.tolist() == [6, 7, 8, 9]
    assert np.array_equal(seq.hidden, bits(_rows([0, 1, 2, 3])))
    assert seq.superseded == 2

    a.add("s", np.array([0, 1]), np.array([5, 66]), bits(_rows([0, 1])))  # last row at 1 is bogus
    with pytest.raises(IncompleteSequence, match="not in the final sequence"):
        a.finish("s", [5, 6, 7])
    a.add("t", np.array([0, 2]), np.array([5, 7]), bits(_rows([0, 2])))
    with pytest.raises(IncompleteSequence, match=r"rows for 2 of 3 positions \(missing e.g. \[1\]\)"):
        a.finish("t", [5, 6, 7, 8])


def test_assembler_mtp_ids_are_the_next_token():
    a = SequenceAssembler(ids_offset=1)
    bits = _rows([0, 1]).view(torch.int16).numpy().view(np.uint16)
    a.add("r", np.array([0, 1]), np.array([6, 7]), bits)
    assert a.finish("r", [5, 6, 7]).next_token.tolist() == [6, 7]


def test_interleaved_chunked_steps_land_as_whole_sequences(tmp_path):
    store = _store(tmp_path)
    cap = Capturer(store.writer("w"), width=W, rows_per_step=16, slots=2)
    a, b = [1, 2, 3, 4, 5, 6, 7], [1, 9, 9, 4]
    # step 1: a's first prefill chunk (4) + b's whole prompt (3); step 2: a's rest (3) + b decode
    cap.add_step(["a", "b"], [4, 3], torch.cat([_rows(range(4)), _rows(range(3), 0.5)]),
                 torch.tensor(a[:4] + b[:3]), torch.tensor([0, 1, 2, 3, 0, 1, 2]))
    cap.add_step(["a", "b"], [3, 1], torch.cat([_rows(range(4, 7)), _rows([3], 0.5), _rows([0])]),  # padded row
                 torch.tensor(a[4:7] + b[3:] + [0]), torch.tensor([4, 5, 6, 3, 0]))
    cap.finish("b", b + [2])
    cap.finish("a", a)
    cap.close()
    s = cap.stats
    assert (s.sequences, s.rows, s.dropped_sequences, s.steps) == (2, 6 + 4, 0, 2)
    assert s.bytes == 10 * W * 2
    seqs = {q.prompt_id: q for q in StoreReader(str(tmp_path / "cap")).sequences()}
    assert list(seqs) == ["b", "a"]  # written in finishing order
    assert seqs["a"].next_token.tolist() == a[1:] and seqs["a"].position.tolist() == list(range(6))
    assert np.array_equal(seqs["a"].hidden, _rows(range(6)).view(torch.int16).numpy().view(np.uint16))
    assert np.array_equal(seqs["b"].hidden, _rows(range(4), 0.5).view(torch.int16).numpy().view(np.uint16))


def test_incomplete_request_is_counted_not_written(tmp_path):
    cap = Capturer(_store(tmp_path).writer("w"), width=W, rows_per_step=8)
    cap.add_step(["a"], [2], _rows([0, 1]), torch.tensor([1, 2]), torch.tensor([0, 1]))
    cap.finish("a", [1, 2, 3, 4])  # position 2 was never captured
    cap.close()
    assert (cap.stats.dropped_sequences, cap.stats.dropped_rows, cap.stats.sequences) == (1, 2, 0)
    assert CaptureStore.open(str(tmp_path / "cap")).committed("w") == (0, 0)


class SlowWriter:
    """The real GroupWriter behind a delay: a store that falls behind the server."""

    def __init__(self, writer, delay):
        self.w, self.delay = writer, delay

    def append_sequence(self, *a, **k):
        time.sleep(self.delay)
        self.w.append_sequence(*a, **k)

    def flush(self):
        self.w.flush()

    def close(self):
        self.w.close()


def test_slow_store_gives_back_pressure_not_loss(tmp_path):
    cap = Capturer(SlowWriter(_store(tmp_path).writer("w"), 0.02), width=W, rows_per_step=4, slots=1,
                   queue_size=2)
    n = 30
    for i in range(n):
        cap.add_step([f"r{i}"], [3], _rows([0, 1, 2]), torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2]))
        cap.finish(f"r{i}", [1, 2, 3, 4])
    cap.close()
    s = cap.stats
    assert s.blocked_seconds > 0.1 and s.max_queued <= 2  # the hook waited; the queue stayed bounded
    assert (s.sequences, s.rows, s.dropped_sequences) == (n, 3 * n, 0)
    assert CaptureStore.open(str(tmp_path / "cap")).committed("w") == (3 * n, n)


def test_wrong_row_width_is_refused(tmp_path):
    cap = Capturer(_store(tmp_path).writer("w"), width=W, rows_per_step=4)
    with pytest.raises(ValueError, match="rows are 4 wide, the store expects 8"):
        cap.add_step(["a"], [1], torch.zeros(1, 4, dtype=torch.bfloat16), torch.tensor([1]), torch.tensor([0]))
    cap.close()


def test_open_capturer_resumes_the_group_and_refuses_another_point(tmp_path):
    path, meta = str(tmp_path / "cap"), StoreMeta(hidden_size=W, capture_point="mtp_input")
    for session in range(2):  # the second numbers its sequences on from the first's commit
        cap = open_capturer(path, meta, "w", rows_per_step=4)
        cap.add_step(["a"], [2], _rows([0, 1]), torch.tensor([1, 2]), torch.tensor([0, 1]))
        cap.finish("a", [1, 2, 3])
        cap.close()
    assert [q.seq for q in StoreReader(path).sequences()] == [0, 1]
    with pytest.raises(ValueError, match="store holds capture point 'mtp_input', not 'target_pre_head'"):
        open_capturer(path, StoreMeta(hidden_size=W), "w2", rows_per_step=4)
    assert CaptureStore.open(path).writer_names() == ["w"]  # refused before a writer group was made

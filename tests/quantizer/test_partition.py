"""Partition plans and the held-out split on real Zarr stores (no model): every sequence in
exactly one partition of one split, whole sequences, balanced rows, the split by prompt and
seeded, the errors; a worker reading a partition's runs gets exactly its rows and reads
fewer bytes than the store holds; the fixed-point Hessian sums are exact under any grouping."""
import numpy as np
import pytest
import torch

from requant.quantizer.core.hessian import FixedPointSum, HessianSet, fixed_point_shift, pack_upper, unpack_upper
from requant.quantizer.stage.partition import assign, heldout_prompts, plan_partitions
from requant.storage import CaptureStore, Layout, StoreMeta, StoreReader

WIDTH = 64


def _store(path, seqs, seed=0, prompt=lambda i: f"p{i}"):
    """A store of ``seqs`` sequences (lengths 5…40) in two writer groups, 32-row chunks."""
    rng = np.random.default_rng(seed)
    st = CaptureStore.create(str(path), StoreMeta(hidden_size=WIDTH, hc_mult=1), Layout(rows_per_chunk=32))
    lens = rng.integers(5, 40, seqs)
    for g in range(2):
        with st.writer(f"w{g}") as w:
            for i in range(g, seqs, 2):
                n = int(lens[i])
                w.append_sequence(i, rng.integers(0, 1 << 15, (n, WIDTH), dtype=np.uint16), np.arange(n) % 7,
                                  np.arange(n), prompt_id=prompt(i))
    return str(path), lens


def _sequences(plan, split):
    return [(r.store, r.writer, k) for p in plan.parts(split) for r in p.runs for k in range(r.k0, r.k1)]


def test_every_sequence_once_whole_and_balanced(tmp_path):
    a, lens_a = _store(tmp_path / "a", 30)
    b, lens_b = _store(tmp_path / "b", 20, seed=1, prompt=lambda i: f"q{i}")
    plan = plan_partitions([a, b], partitions=5, holdout=0.2, seed=3)
    cal, ho = _sequences(plan, "calibration"), _sequences(plan, "heldout")
    assert len(cal) + len(ho) == 50 and not set(cal) & set(ho) and len(set(cal)) == len(cal)
    assert plan.rows("calibration") + plan.rows("heldout") == int(lens_a.sum() + lens_b.sum())
    assert len(plan.calibration) == 5 and plan.prompts == {"calibration": 40, "heldout": 10}
    assert len(plan.heldout) == round(5 * plan.rows("heldout") / plan.rows("calibration"))
    rows = [p.rows for p in plan.calibration]
    assert max(rows) - min(rows) <= 2 * 40  # balanced to within a sequence or two
    with StoreReader([a, b]) as reader:
        for p in plan.calibration + plan.heldout:
            assert reader.run_rows(p.reader_runs()) == p.rows
    assert plan_partitions([a, b], partitions=5, holdout=0.2, seed=3).id == plan.id
    assert plan_partitions([a, b], partitions=6, holdout=0.2, seed=3).id != plan.id


def test_heldout_split_is_by_prompt_seeded_and_order_free(tmp_path):
    a, _ = _store(tmp_path / "a", 24)
    b, _ = _store(tmp_path / "b", 24, seed=1)   # the same prompt ids captured again
    plan = plan_partitions([a, b], holdout=0.25, seed=0)
    held = {(s, w, k) for s, w, k in _sequences(plan, "heldout")}
    ids = {}
    for si, path in enumerate((a, b)):
        st = CaptureStore.open(path)
        for w in st.writer_names():
            for k, pid in enumerate(st.index(w)["prompt_id"]):
                ids.setdefault(str(pid), set()).add((si, w, k) in held)
    assert all(len(v) == 1 for v in ids.values())  # a prompt is on one side in both stores
    assert sum(v == {True} for v in ids.values()) == 6
    assert heldout_prompts(list(ids), 0.25, 0) == heldout_prompts(sorted(ids, reverse=True), 0.25, 0)
    assert heldout_prompts(list(ids), 0.25, 0) != heldout_prompts(list(ids), 0.25, 1)
    none = plan_partitions([a], holdout=0.0)
    assert not none.heldout and none.prompts["heldout"] == 0 and len(_sequences(none, "calibration")) == 24


def test_bad_plans_are_clear_errors(tmp_path):
    a, _ = _store(tmp_path / "a", 8)
    with pytest.raises(ValueError, match=r"held-out fraction 0.05 of 8 prompt\(s\) holds none out"):
        plan_partitions([a], holdout=0.05)
    with pytest.raises(ValueError, match=r"leaves none for calibration"):
        plan_partitions([a], holdout=0.95)
    with pytest.raises(ValueError, match=r"9 calibration partitions but only 8 calibration sequence"):
        plan_partitions([a], partitions=9, holdout=0)
    with pytest.raises(ValueError, match="partitions must be ≥ 1"):
        plan_partitions([a], partitions=0)


def test_assign_is_contiguous_balanced_and_says_who_idles(tmp_path):
    a, _ = _store(tmp_path / "a", 40)
    parts = plan_partitions([a], partitions=8, holdout=0).calibration
    for w in (1, 2, 3, 4, 8):
        share = assign(parts, w)
        flat = [i for s in share for i in s]
        assert flat == list(range(8)) and all(s == list(range(s[0], s[-1] + 1)) for s in share if s)
        assert all(s for s in share)
    share = assign(parts, 11)
    assert [len(s) for s in share] == [1] * 8 + [0] * 3


def test_reading_a_partition_reads_its_rows_only(tmp_path):
    """Both reader paths (whole sequences, row batches) give exactly the partition's rows, in
    order, and each partition's reader fetched only part of the store."""
    a, _ = _store(tmp_path / "a", 40)
    plan = plan_partitions([a], partitions=4, holdout=0.25)
    with StoreReader([a]) as whole:
        everything = {(b.writer, b.first_row + i): b.hidden[i] for b in whole.batches() for i in range(len(b))}
        total = whole.bytes_read
    idx = {w: CaptureStore.open(a).index(w) for w in ("w0", "w1")}
    for p in plan.calibration + plan.heldout:
        want = [(r.writer, row) for r in p.runs
                for k in range(r.k0, r.k1)
                for row in range(int(idx[r.writer]["first_row"][k]), int(idx[r.writer]["first_row"][k] +
                                                                          idx[r.writer]["length"][k]))]
        with StoreReader([a]) as reader:
            seqs = list(reader.sequences(max_rows=64, runs=p.reader_runs()))
            got = [row for s in seqs for row in s.hidden]
            assert len(got) == len(want) == p.rows
            assert all(np.array_equal(g, everything[k]) for g, k in zip(got, want))
            first = reader.bytes_read
            rows = [(b.writer, b.first_row + i) for b in reader.batches(max_rows=48, runs=p.reader_runs())
                    for i in range(len(b))]
            assert rows == want
            assert 0 < first < total
    with pytest.raises(ValueError, match="outside the committed index"):
        list(StoreReader([a]).sequences(runs=[(0, "w0", 0, 99)]))


def test_fixed_point_sums_are_exact_under_any_grouping():
    """fp32 partials folded one by one, in reverse, or as two halves summed as integers (what
    a collective does): identical int64 sums — upper triangles in blocks of 2 experts, the
    same integers as rounding the full matrices; back in fp32 they match a float64 sum, packed
    or unpacked (the same bits as the full-matrix conversion)."""
    g = torch.Generator().manual_seed(0)
    E, D, rows = 3, 32, 100
    parts = []
    for _ in range(6):
        hs = HessianSet(E, D)
        x = torch.randn(rows, D, generator=g).bfloat16()
        hs.add(x, torch.randint(0, E, (rows, 2), generator=g))
        parts.append(hs)
    bound = torch.full((E,), float(max(float(p.h.abs().max()) for p in parts)) / rows * 4)
    shift = fixed_point_shift(bound, rows * len(parts))

    def fold(order):
        s = FixedPointSum(E, D, shift, bound, block=2)
        for i in order:
            s.add_(parts[i], rows)
        return s

    seq, rev = fold(range(6)), fold(reversed(range(6)))
    lo, hi = fold(range(3)), fold(range(3, 6))
    assert seq.blocks == [(0, 2), (2, 3)] and [q.shape for q in seq.q] == [(2, D * (D + 1) // 2), (1, 528)]
    assert all(torch.equal(a, b) and torch.equal(a, c + d) for a, b, c, d in zip(seq.q, rev.q, lo.q, hi.q))
    assert torch.equal(seq.count, sum(p.count for p in parts))
    scale = torch.ldexp(torch.ones(E, dtype=torch.float64), shift)[:, None, None]
    full = sum(torch.round(p.h * scale.float()).long() for p in parts)    # whole matrices, as int64
    assert torch.equal(torch.cat(seq.q), pack_upper(full))
    ref = sum(p.h.double() for p in parts)
    back = seq.to_set().h
    assert back.dtype == torch.float32 and float((back.double() - ref).abs().max() / ref.abs().max()) < 1e-6
    assert torch.equal(pack_upper(back), pack_upper((full.double() / scale).float())) and torch.equal(back, back.mT)
    assert torch.equal(seq.to_set(slice(1, 3)).h, back[1:3])
    packed = seq.to_packed(free=False)
    assert packed.nbytes == 4 * E * (D * (D + 1) // 2) and torch.equal(packed.sums(), back)
    assert torch.equal(packed.mean([2, 0]), seq.to_set().mean([2, 0]))
    with pytest.raises(ValueError, match="do not cover whole blocks"):
        seq.to_packed(slice(1, 3))
    mine = seq.to_packed(slice(0, 2))            # an owner's slice: its int64 blocks are freed
    assert seq.q[0] is None and torch.equal(mine.sums(), back[:2]) and torch.equal(mine.count, seq.count[:2])
    with pytest.raises(RuntimeError, match="already reduced away"):
        seq.add_(parts[0], rows)
    with pytest.raises(RuntimeError, match="exceeds the fixed-point bound"):
        FixedPointSum(E, D, shift, bound / 100).add_(parts[0], rows)
    bad = HessianSet(E, D)
    bad.h[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite partial Hessian"):
        FixedPointSum(E, D, shift, bound).add_(bad, rows)


def test_packed_upper_triangle_round_trip_is_exact():
    """pack_upper/unpack_upper: a symmetric matrix back bit for bit (fp32 and int64, odd and
    DSV-like sizes), row-major upper-triangle order."""
    g = torch.Generator().manual_seed(1)
    for d, dtype in ((1, torch.float32), (5, torch.float32), (128, torch.float32), (33, torch.int64)):
        a = torch.randn(3, d, d, generator=g, dtype=torch.float64)
        a = (a + a.mT) * 1e7
        a = a.to(dtype)
        p = pack_upper(a)
        assert p.shape == (3, d * (d + 1) // 2) and p.dtype == dtype
        assert torch.equal(unpack_upper(p, d), a)
    m = torch.arange(9.).reshape(1, 3, 3)
    assert pack_upper(m).tolist() == [[0, 1, 2, 4, 5, 8]]

"""Round trips, resume, concurrency, memory bound, bad input and the CLI."""
import json
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from requant.storage import (CaptureStore, CorruptStoreError, IncompatibleStoreError, Layout, NotAStoreError, StoreError,
                             StoreMeta, StoreReader)

META = StoreMeta(hidden_size=64, hc_mult=4, model="tiny-dsv4", capture_point="target_pre_head")
LAYOUT = Layout(rows_per_chunk=64, chunks_per_shard=4)


def make(tmp_path, name="s", layout=LAYOUT):
    return CaptureStore.create(str(tmp_path / name), META, layout)


def test_bf16_round_trip_is_bit_exact_for_every_pattern(tmp_path):
    store = make(tmp_path)
    bits = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # every bf16 incl. NaNs, ±inf, -0
    as_torch = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
    with store.writer("r0") as w:
        w.append_sequence(0, as_torch[:100], np.arange(100), np.arange(100), prompt_id="a")
        w.append_sequence(1, bits[100:].reshape(156, 4, 64), np.arange(156), np.arange(156), prompt_id="b")
    batches = list(StoreReader(store.path).batches())
    hidden = np.concatenate([b.hidden for b in batches])
    assert np.array_equal(hidden, bits)
    assert torch.equal(torch.cat([b.hidden_torch() for b in batches]).view(torch.int16),
                       as_torch.view(torch.int16))


def test_sequences_in_order_across_chunks_and_a_partial_last_chunk(tmp_path):
    store = make(tmp_path)
    rng = np.random.default_rng(0)
    seqs = {s: rng.integers(0, 65536, (int(rng.integers(1, 150)), 256), dtype=np.uint16) for s in range(30)}
    with store.writer("r0") as w:
        for s, h in seqs.items():
            w.append_sequence(s, h, np.full(len(h), s), np.arange(len(h)), prompt_id=f"p{s}", replica=2)
    rows = sum(len(h) for h in seqs.values())
    assert rows % LAYOUT.rows_per_chunk != 0  # the last chunk is partial
    out = list(StoreReader(store.path).sequences(max_bytes=4 << 20))
    assert [o.seq for o in out] == list(seqs)
    for o in out:
        assert np.array_equal(o.hidden, seqs[o.seq]) and (o.next_token == o.seq).all()
        assert o.prompt_id == f"p{o.seq}" and o.replica == 2 and list(o.position) == list(range(len(o.hidden)))


def test_reopen_resumes_after_last_commit(tmp_path):
    store = make(tmp_path)
    h = np.ones((10, 256), np.uint16)
    with store.writer("r0") as w:
        w.append_sequence(0, h, np.arange(10), np.arange(10))
    store = CaptureStore.open(store.path, mode="r+")
    with store.writer("r0") as w:
        w.append_sequence(1, 2 * h, np.arange(10), np.arange(10))
    assert store.committed("r0") == (20, 2)
    assert [s.seq for s in StoreReader(store.path).sequences()] == [0, 1]
    assert store.verify() == []


def test_shuffle_is_seeded_permutation(tmp_path):
    store = make(tmp_path)
    with store.writer("r0") as w:
        for s in range(20):
            w.append_sequence(s, np.full((20, 256), s, np.uint16), np.arange(20), np.arange(20))
    r = StoreReader(store.path)
    a = np.concatenate([b.seq for b in r.batches(max_rows=64, shuffle=True, seed=7)])
    b = np.concatenate([b.seq for b in r.batches(max_rows=64, shuffle=True, seed=7)])
    c = np.concatenate([b.seq for b in r.batches(max_rows=64)])
    for prefetch in (0, 3):
        d = np.concatenate([b.seq for b in r.batches(max_rows=64, shuffle=True, seed=7, prefetch=prefetch)])
        assert np.array_equal(a, d)
    ordered = np.concatenate([b.seq for b in r.batches(max_rows=64, prefetch=3)])
    assert np.array_equal(ordered, c)
    assert np.array_equal(a, b) and not np.array_equal(a, c) and np.array_equal(np.sort(a), np.sort(c))


def test_two_writers_in_separate_groups_concurrently(tmp_path):
    store = make(tmp_path)

    def write(name, base):
        with store.writer(name, flush_rows=50) as w:
            for s in range(40):
                w.append_sequence(base + s, np.full((13, 256), s, np.uint16), np.arange(13), np.arange(13))

    threads = [threading.Thread(target=write, args=(f"replica{i}", 1000 * i)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    info = store.info()
    assert info.writers == {"replica0": (520, 40), "replica1": (520, 40)}
    assert store.verify() == []
    assert StoreReader([store.path]).rows == 1040


@pytest.mark.parametrize("threads", [2, 16])
def test_reading_under_a_memory_cap_stays_under_it(tmp_path, threads):
    # 16 threads' decode buffers alone exceed the 5 MiB cap: fewer chunks decode at once.
    store = CaptureStore.create(str(tmp_path / "m"), StoreMeta(hidden_size=256, hc_mult=4),
                                Layout(rows_per_chunk=128, chunks_per_shard=4))
    rng = np.random.default_rng(0)
    with store.writer("a") as w:
        for s in range(24):  # incompressible rows: the worst case for decode buffers
            w.append_sequence(s, rng.integers(0, 65536, (128, 1024), dtype=np.uint16), np.arange(128), np.arange(128))
    reader = StoreReader(store.path, threads=threads)
    for cap in (5 << 20, 12 << 20):
        for it in (lambda: reader.batches(max_bytes=cap), lambda: reader.sequences(max_bytes=cap),
                   lambda: reader.batches(max_bytes=cap, shuffle=True), lambda: reader.batches(max_bytes=cap, prefetch=False),
                   lambda: reader.batches(max_bytes=cap, prefetch=3), lambda: reader.sequences(max_bytes=cap, prefetch=2)):
            tracemalloc.start()
            n = sum(len(b.hidden) for b in it())
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert n == 24 * 128
            assert peak <= cap, (cap, peak)
    assert reader.decoders == min(threads, 6)  # prefetch=3 holds 5 batches: (5 MiB − 5 chunks) // 2.2 chunks
    with pytest.raises(ValueError, match="below one chunk"):
        next(reader.batches(max_bytes=1 << 20))
    with pytest.raises(ValueError, match=r"writers/a: sequence 0 has 128 rows; the memory bound allows 100"):
        next(reader.sequences(max_rows=100))


def test_bad_appends_are_refused_with_the_path(tmp_path):
    store = make(tmp_path)
    with store.writer("r0") as w:
        with pytest.raises(ValueError, match=r"r0 seq 5: hidden must be \[tokens, 256\]"):
            w.append_sequence(5, np.zeros((3, 255), np.uint16), np.arange(3), np.arange(3))
        with pytest.raises(ValueError, match="must be torch.bfloat16 or its uint16"):
            w.append_sequence(5, np.zeros((3, 256), np.float32), np.arange(3), np.arange(3))
        with pytest.raises(ValueError, match="hidden must be bfloat16"):
            w.append_sequence(5, torch.zeros(3, 256), np.arange(3), np.arange(3))
        with pytest.raises(ValueError, match="next_token must be 3 integers"):
            w.append_sequence(5, np.zeros((3, 256), np.uint16), np.arange(2), np.arange(3))
        w.append_sequence(6, np.zeros((3, 256), np.uint16), np.arange(3), np.arange(3))
    assert store.committed("r0") == (3, 1)  # nothing lost to the refused appends


def test_opening_things_that_are_not_stores(tmp_path):
    with pytest.raises(NotAStoreError, match="no such directory"):
        CaptureStore.open(str(tmp_path / "missing"))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("hi")
    with pytest.raises(NotAStoreError, match="plain"):
        CaptureStore.open(str(tmp_path / "plain"))
    import zarr
    zarr.open_group(str(tmp_path / "zg"), mode="w")
    with pytest.raises(NotAStoreError, match="not a requant capture store"):
        CaptureStore.open(str(tmp_path / "zg"))
    store = make(tmp_path)
    with pytest.raises(FileExistsError, match="not empty"):
        make(tmp_path)
    with pytest.raises(ValueError, match="rows of 4×64"):
        CaptureStore.create(store.path, StoreMeta(hidden_size=128, hc_mult=4), exist_ok=True)


def test_incompatible_version_is_refused(tmp_path):
    store = make(tmp_path)
    meta = json.loads((Path(store.path) / "zarr.json").read_text())
    meta["attributes"]["requant_store"]["format"] = 99
    (Path(store.path) / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(IncompatibleStoreError, match="format 99"):
        CaptureStore.open(store.path)


def _filled(tmp_path):
    store = make(tmp_path)
    rng = np.random.default_rng(1)
    with store.writer("r0") as w:
        for s in range(12):
            w.append_sequence(s, rng.integers(0, 65536, (40, 256), dtype=np.uint16), np.arange(40), np.arange(40))
    return store


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "requant.orchestrator.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_flipped_byte_is_caught_by_verify(tmp_path):
    store = _filled(tmp_path)
    assert _cli("store", "verify", store.path).returncode == 0
    shard = Path(store.path) / "writers/r0/hidden/c/0/0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x40
    shard.write_bytes(bytes(data))
    problems = CaptureStore.open(store.path).verify()
    assert problems and "writers/r0/hidden" in problems[0]
    out = _cli("store", "verify", store.path)
    assert out.returncode == 1 and "hidden" in out.stderr
    with pytest.raises(StoreError, match="writers/r0: rows .* unreadable"):
        list(StoreReader(store.path).batches())


def test_truncated_chunk_and_missing_index_are_reported(tmp_path):
    store = _filled(tmp_path)
    shard = Path(store.path) / "writers/r0/next_token/c/1"
    shard.write_bytes(shard.read_bytes()[:10])
    assert any("next_token" in p for p in CaptureStore.open(store.path).verify())
    import shutil
    shutil.rmtree(Path(store.path) / "writers/r0/index/length")
    problems = CaptureStore.open(store.path).verify()
    assert any("missing index array 'length'" in p for p in problems)


def test_info_cli_reports_counts_and_ratio(tmp_path):
    store = _filled(tmp_path)
    out = _cli("store", "info", store.path)
    assert out.returncode == 0
    assert "rows       480  sequences 12" in out.stdout and "tiny-dsv4" in out.stdout and "ratio" in out.stdout
    bad = _cli("store", "info", str(tmp_path / "nope"))
    assert bad.returncode == 2 and "no such directory" in bad.stderr


def test_fsspec_url(tmp_path):
    url = f"file://{tmp_path}/remote"
    store = CaptureStore.create(url, META, LAYOUT)
    with store.writer("r0") as w:
        w.append_sequence(0, np.ones((5, 256), np.uint16), np.arange(5), np.arange(5), prompt_id="x")
    assert [s.prompt_id for s in StoreReader(url).sequences()] == ["x"]
    assert CaptureStore.open(url).verify() == []


def test_direct_shard_reads_equal_zarr_reads(tmp_path):
    store = _filled(tmp_path)
    fast = [b.hidden for b in StoreReader(store.path).batches(max_rows=100)]
    slow = [b.hidden for b in StoreReader(store.path, direct=False).batches(max_rows=100)]
    assert len(fast) == len(slow) and all(np.array_equal(a, b) for a, b in zip(fast, slow))


def test_directly_written_shards_read_back_through_zarr(tmp_path, monkeypatch):
    """Whole shards bypass zarr on write: zarr itself must read them bit for bit."""
    import zarr
    store = CaptureStore.create(str(tmp_path / "d"), META, Layout(rows_per_chunk=16, chunks_per_shard=4))
    rng = np.random.default_rng(3)
    data = rng.integers(0, 65536, (300, 256), dtype=np.uint16)
    with store.writer("r0", flush_rows=128) as w:
        for s in range(10):
            w.append_sequence(s, data[30 * s:30 * (s + 1)], np.arange(30), np.arange(30))
    assert (Path(store.path) / "writers/r0/hidden/c/1/0").exists()
    assert np.array_equal(zarr.open_array(f"{store.path}/writers/r0/hidden", mode="r")[:300], data)
    assert store.verify() == []


def test_one_writer_per_group(tmp_path):
    store = make(tmp_path)
    w = store.writer("r0")
    assert store.held_writers() == ["r0"]  # what a capture job waits on before it reconciles
    with pytest.raises(StoreError, match=r"writers/r0: another writer has this group open"):
        CaptureStore.open(store.path, mode="r+").writer("r0")
    with store.writer("r1") as other:  # other groups are free
        other.append_sequence(0, np.ones((2, 256), np.uint16), np.arange(2), np.arange(2), prompt_id="p")
    w.close()
    assert store.held_writers() == []
    with store.writer("r0") as w:  # released on close
        w.append_sequence(0, np.ones((2, 256), np.uint16), np.arange(2), np.arange(2))
    assert store.info().writers == {"r0": (2, 1), "r1": (2, 1)}
    assert store.prompt_ids("r1") == ((2, 1), ["p"]) and store.prompt_ids("r1", start=1) == ((2, 1), [])


@pytest.mark.parametrize("direct", [None, False])
def test_partial_shards_rewritten_across_flushes_and_sessions(tmp_path, direct):
    """Commits that end inside shards and chunks (flush after every sequence, several writer
    sessions): zarr reads the directly written shards bit for bit, the index matches."""
    import zarr
    store = CaptureStore.create(str(tmp_path / "p"), META, Layout(rows_per_chunk=16, chunks_per_shard=4))
    rng = np.random.default_rng(5)
    lengths = [int(x) for x in rng.integers(1, 40, 36)]
    data = rng.integers(0, 65536, (sum(lengths), 256), dtype=np.uint16)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    for session in range(3):
        with CaptureStore.open(store.path, mode="r+").writer("r0", flush_rows=64, direct=direct) as w:
            for s in range(12 * session, 12 * session + 12):
                w.append_sequence(s, data[starts[s]:starts[s + 1]], np.arange(lengths[s]), np.arange(lengths[s]))
                if s % 3:
                    w.flush()
    assert store.committed("r0") == (len(data), 36)
    assert np.array_equal(zarr.open_array(f"{store.path}/writers/r0/hidden", mode="r")[:len(data)], data)
    got = list(StoreReader(store.path).sequences())
    assert [g.seq for g in got] == list(range(36))
    assert all(np.array_equal(g.hidden, data[starts[g.seq]:starts[g.seq + 1]]) for g in got)
    assert store.verify() == []
    assert not list(Path(store.path).rglob("*.partial"))


def test_missing_chunk_file_is_reported(tmp_path):
    store = _filled(tmp_path)
    (Path(store.path) / "writers/r0/hidden/c/1/0").unlink()
    (Path(store.path) / "writers/r0/position/c/0").unlink()
    problems = CaptureStore.open(store.path).verify()
    assert any("hidden" in p and "missing" in p for p in problems), problems
    assert any("position" in p and "missing" in p for p in problems), problems
    with pytest.raises(StoreError, match="writers/r0"):
        list(StoreReader(store.path).batches())


def test_corrupt_partial_shard_refuses_the_writer_and_releases_the_group(tmp_path):
    store = _filled(tmp_path)  # 480 rows: shard 1 (rows 256–480) is partial
    shard = Path(store.path) / "writers/r0/hidden/c/1/0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    for _ in range(2):  # the second try would say "another writer" if the lock leaked
        with pytest.raises(CorruptStoreError, match=r"writers/r0/hidden: the last partial shard .* 256–480"):
            CaptureStore.open(store.path, mode="r+").writer("r0")
    assert store.committed("r0") == (480, 12)


def test_checksum_pieces_combine_in_any_order():
    """A sequence read in pieces (batch edges) checks as if read whole."""
    import crc32c

    from requant.storage.checksum import combine

    rng = np.random.default_rng(4)
    data = rng.integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    for cut in (0, 1, 4096, 9_999):
        a, b = data[:cut], data[cut:]
        assert combine(crc32c.crc32c(a), crc32c.crc32c(b), len(b)) == crc32c.crc32c(data)


def test_format_2_stores_still_read_write_and_verify(tmp_path):
    """Stores written before checksums (format 2) open, take appends in their own format and verify."""
    old = CaptureStore.create(str(tmp_path / "f2"), StoreMeta(hidden_size=64, hc_mult=4, format=2), LAYOUT)
    with old.writer("r0") as w:
        w.append_sequence(0, np.ones((5, 256), np.uint16), np.arange(5), np.arange(5), prompt_id="x")
    store = CaptureStore.open(old.path, mode="r+")
    assert not store.checksummed and store.meta.uid == ""
    with store.writer("r0") as w:
        w.append_sequence(1, 2 * np.ones((3, 256), np.uint16), np.arange(3), np.arange(3), prompt_id="y")
    assert store.committed("r0") == (8, 2) and "crc" not in store.group("r0")["index"]
    assert [s.prompt_id for s in StoreReader(old.path).sequences()] == ["x", "y"] and store.verify() == []


def test_a_chunk_swapped_for_another_stores_is_named(tmp_path):
    """Its own crc32c is valid: only the sequence checksums (format 3) tell it is not this store's."""
    import shutil

    a = _filled(tmp_path)
    b = make(tmp_path, "other")
    with b.writer("r0") as w:
        for s in range(12):
            w.append_sequence(s, np.full((40, 256), s, np.uint16), np.arange(40), np.arange(40))
    shutil.copyfile(Path(b.path) / "writers/r0/hidden/c/0/0", Path(a.path) / "writers/r0/hidden/c/0/0")
    problems = CaptureStore.open(a.path).verify()
    assert problems and "hidden rows do not match their checksum" in problems[0] and "hidden/c/0/0" in problems[0]
    with pytest.raises(StoreError, match="do not match their checksum"):
        list(StoreReader(a.path).batches(max_rows=50))


def test_processes_creating_one_store_at_once_share_it(tmp_path):
    import multiprocessing as mp

    from ._create_worker import create_and_write

    path = str(tmp_path / "shared")
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=create_and_write, args=(path, i, barrier, out)) for i in range(3)]
    for p in procs:
        p.start()
    uids = {out.get(timeout=120) for _ in procs}
    for p in procs:
        p.join(60)
    store = CaptureStore.open(path)
    assert len(uids) == 1 and uids == {store.meta.uid}
    assert store.writer_names() == ["replica0", "replica1", "replica2"] and store.verify() == []
    assert not [p for p in tmp_path.iterdir() if ".creating-" in p.name]


def test_create_on_an_object_store_keeps_what_is_there():
    """``create(exist_ok=True)`` (every capture server's start-up) opens a remote store that
    exists instead of recreating it empty; without ``exist_ok`` it is refused."""
    url = "memory://requant-test-remote"
    store = CaptureStore.create(url, META, LAYOUT)
    with store.writer("r0") as w:
        w.append_sequence(0, np.ones((5, 256), np.uint16), np.arange(5), np.arange(5))
    again = CaptureStore.create(url, META, LAYOUT, exist_ok=True)
    assert again.meta.uid == store.meta.uid and again.committed("r0") == (5, 1)
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        CaptureStore.create(url, META, LAYOUT)

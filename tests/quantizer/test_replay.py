"""Replay (quantizer/stage/replay.py) on a store captured from the tiny DeepSeek-V4 fixture with the hf
engine: Hessians against a direct computation from the block's outputs, independence of the
memory bound (batching) and of the expert slice, fold windows (chunked fp32 partials) against a
whole-set partial and across workers, routing counts, store/master mismatches."""
import os

import pytest
import torch

from requant.quantizer.mtp.arch import load_block
from requant.quantizer.core.hessian import swiglu_intermediate
from requant.quantizer.stage.partition import plan_partitions
from requant.quantizer.stage.replay import (HessianAccumulator, ReplayConfig, _chunks, accumulate_hessians,
                                      check_store_matches, new_sums, replay_partitions, route_counts)
from requant.storage import CaptureStore, StoreMeta, StoreReader
from requant.storage.reader import DECODE_FACTOR_DIRECT

ROW_BYTES = 4 * 512 * 2 + 16
# replay memory for reader batches of ~64 rows (the capture's 16-row chunks) on this machine's core
# count: the reader gets half, minus its decode buffers, for 3 batches in flight
SMALL = 2 * (int(min(16, os.cpu_count() or 1) * DECODE_FACTOR_DIRECT * 16 * ROW_BYTES) + 3 * 64 * ROW_BYTES)


@pytest.fixture(scope="module")
def setup(tiny_dsv4, dsv4_capture):
    """The shared capture (requant.testing.stores.capture_dsv4: 16-row chunks, sequences < 64 rows)."""
    return tiny_dsv4, dsv4_capture, load_block(tiny_dsv4, device="cpu")


@pytest.fixture(autouse=True)
def _row_count_invariant_gemms():
    """ATen's own bf16 GEMMs, not oneDNN's: on AMX CPUs oneDNN rounds by row count, and these tests
    compare batchings of the same rows (routing would flip at near ties)."""
    with torch.backends.mkldnn.flags(enabled=False):
        yield


def _all_rows(store):
    with StoreReader([store]) as r:
        seqs = list(r.sequences())
    hidden = torch.cat([s.hidden_torch() for s in seqs])
    tok = torch.cat([torch.from_numpy(s.next_token).long() for s in seqs])
    pos = torch.cat([torch.from_numpy(s.position).long() for s in seqs])
    return hidden, tok, pos, [len(s.next_token) for s in seqs]


@pytest.mark.parametrize("mode", ["identity", "full"])
def test_hessians_equal_direct_computation(setup, mode):
    """h_in / h_mid (both weightings) per expert = Σ over the rows the gate sends there, computed
    here directly from one moe_inputs call over the whole store."""
    _, store, block = setup
    hidden, tok, pos, lens = _all_rows(store)
    X, ids, g = block.moe_inputs(hidden, tok, pos, mode, lens if mode == "full" else None)
    w1, _, w3 = block.expert_weights()
    res = {w: accumulate_hessians(block, [store], ReplayConfig(mode=mode, w2_weighting=w, device="cpu"))
           for w in ("none", "routing")}
    assert res["none"].rows == hidden.shape[0] > 300
    for e in range(block.spec.n_experts):
        rows, slot = torch.where(ids == e)
        xe = X[rows].float()
        a = swiglu_intermediate(X[rows], w1[e], w3[e], block.spec.swiglu_limit).float()
        ag = a * g[rows, slot, None]
        torch.testing.assert_close(res["none"].h_in.h[e], xe.T @ xe, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(res["none"].h_mid.h[e], a.T @ a, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(res["routing"].h_mid.h[e], ag.T @ ag, rtol=1e-5, atol=1e-3)
        assert int(res["none"].h_in.count[e]) == len(rows) == int(res["none"].tokens_per_expert[e])
    torch.testing.assert_close(res["routing"].h_in.h, res["none"].h_in.h, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["identity", "full"])
def test_result_independent_of_memory_bound(setup, mode):
    """Small batches (memory bound + max_rows) vs one batch: the same rows in the same order.
    Only rounding may differ: fp32 summation grouping, and CPU bf16 GEMM kernels that block
    differently for another row count (seen with 16 threads: a few one-ulp flips in X)."""
    _, store, block = setup
    calls, out = {}, {}
    for name, cfg in (("small", ReplayConfig(mode=mode, max_bytes=SMALL, max_rows=64, device="cpu")),
                      ("whole", ReplayConfig(mode=mode, device="cpu"))):
        seen = []
        out[name] = accumulate_hessians(block, [store], cfg, progress=seen.append)
        calls[name] = seen
    assert len(calls["small"]) >= 5 and len(calls["whole"]) == 1         # really batched differently
    assert max(calls["small"]) <= 64                                     # sequences here are < 64 rows
    assert sum(calls["small"]) == sum(calls["whole"]) == out["small"].rows
    a, b = out["small"], out["whole"]
    moved = (a.tokens_per_expert - b.tokens_per_expert).abs().sum().item()
    assert moved <= 0.01 * a.rows * block.spec.topk
    for name in ("h_in", "h_mid"):
        ha, hb = getattr(a, name).h, getattr(b, name).h
        assert ((ha - hb).norm() / hb.norm()).item() < 2e-3


def test_expert_slice_is_bit_identical_to_full_set(setup):
    """An expert-parallel worker's Hessians equal the single-process ones for its experts, bit for bit."""
    _, store, block = setup
    full = accumulate_hessians(block, [store], ReplayConfig(mode="full", device="cpu"))
    part = accumulate_hessians(block, [store], ReplayConfig(mode="full", device="cpu"), experts=[6, 1])
    assert part.h_in.experts.tolist() == [6, 1] and part.h_in.h.shape[0] == 2
    for i, e in enumerate([6, 1]):
        assert torch.equal(part.h_in.h[i], full.h_in.h[e]) and torch.equal(part.h_mid.h[i], full.h_mid.h[e])
    assert torch.equal(part.tokens_per_expert, full.tokens_per_expert)   # routing counted for every expert
    with pytest.raises(ValueError, match="distinct ids"):
        accumulate_hessians(block, [store], ReplayConfig(device="cpu"), experts=[1, 1])


def test_fold_windows_are_exact_per_partition(setup):
    """The replay folds fp32 partials of FOLD_EXPERTS experts over ``fold_rows`` rows (whole
    batches) of one partition. One window per partition: the int64 sums equal folding a
    whole-set fp32 partial of each partition, bit for bit. Windows of 20 rows in 8-row batches:
    they restart with every partition, so partitions 0–3 folded by one worker or split 0–1 / 2–3
    between two (integer sum) give the same bits; they round differently from one window
    (close, not equal). Blocks of 3 experts leave a short last block; 8 experts, FOLD_EXPERTS 16."""
    _, store, block = setup
    plan = plan_partitions([store], partitions=4, holdout=0)

    def sums(parts, cfg):
        s = new_sums(block, plan, "calibration", "identity", None, "cpu", batch=3)
        with StoreReader([store]) as reader:
            return replay_partitions(block, reader, plan, s, parts, cfg)

    def q(s):
        return [torch.cat(fp.q) for fp in (s.h_in, s.h_mid)]

    whole = ReplayConfig(mode="identity", device="cpu", max_rows=8)
    one = sums(range(4), whole)
    assert [b for b in one.h_in.blocks] == [(0, 3), (3, 6), (6, 8)]
    ref = new_sums(block, plan, "calibration", "identity", None, "cpu", batch=3)
    with StoreReader([store]) as reader, torch.no_grad():
        for part in plan.calibration:   # the previous way: one all-expert fp32 partial per partition
            acc = HessianAccumulator(block, device="cpu")
            for hidden, tok, pos, lens in _chunks(reader, whole, part.reader_runs()):
                acc.add(*block.moe_inputs(hidden, tok, pos, "identity", lens))
            ref.h_in.add_(acc.h_in, acc.rows)
            ref.h_mid.add_(acc.h_mid, acc.rows)
            ref.tokens += acc.tokens
    assert all(torch.equal(a, b) for a, b in zip(q(one), q(ref))) and torch.equal(one.tokens, ref.tokens)
    assert torch.equal(one.h_in.count, ref.h_in.count)

    small = ReplayConfig(mode="identity", device="cpu", max_rows=8, fold_rows=20)
    seq, lo, hi = sums(range(4), small), sums([0, 1], small), sums([2, 3], small)
    assert all(torch.equal(a, b + c) for a, b, c in zip(q(seq), q(lo), q(hi)))
    assert torch.equal(seq.tokens, one.tokens) and seq.rows == one.rows == plan.rows("calibration")
    assert not all(torch.equal(a, b) for a, b in zip(q(seq), q(one)))   # other windows: other roundings
    for a, b in ((seq.h_in, one.h_in), (seq.h_mid, one.h_mid)):
        ha, hb = a.to_set().h.double(), b.to_set().h.double()
        assert ((ha - hb).norm() / hb.norm()).item() < 1e-5


def test_route_counts(setup):
    _, store, block = setup
    rows = StoreReader([store]).rows
    counts = {m: route_counts(block, [store], ReplayConfig(mode=m, device="cpu")) for m in ("identity", "full")}
    for m, c in counts.items():
        assert c.shape == (block.spec.n_experts,) and c.dtype == torch.int64
        assert int(c.sum()) == rows * block.spec.topk
    assert not torch.equal(counts["identity"], counts["full"])           # attention changes routing
    two = route_counts(block, [store, store], ReplayConfig(mode="full", device="cpu"))
    assert torch.equal(two, 2 * counts["full"])


def test_store_mismatches_are_named(setup, tmp_path):
    _, store, block = setup
    narrow = str(tmp_path / "h256")
    CaptureStore.create(narrow, StoreMeta(hidden_size=256, hc_mult=4))
    with pytest.raises(ValueError, match=r"h256: store hidden_size 256 != MTP hidden_size 512"):
        check_store_matches(block, [store, narrow])
    one = str(tmp_path / "hc1")
    CaptureStore.create(one, StoreMeta(hidden_size=512, hc_mult=1))
    with pytest.raises(ValueError, match=r"hc1: store hc_mult 1 != MTP hc_mult 4"):
        accumulate_hessians(block, [one], ReplayConfig(device="cpu"))
    empty = str(tmp_path / "empty")
    CaptureStore.create(empty, StoreMeta(hidden_size=512, hc_mult=4))
    with pytest.raises(ValueError, match=r"empty: store has 0 committed rows"):
        route_counts(block, [empty], ReplayConfig(device="cpu"))
    with pytest.raises(ValueError, match="no capture stores"):
        check_store_matches(block, [])
    with pytest.raises(ValueError, match="replay mode"):
        ReplayConfig(mode="zero")
    with pytest.raises(ValueError, match="w2_weighting"):
        ReplayConfig(w2_weighting="g")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["identity", "full"])
def test_cuda_replay_matches_cpu(setup, mode):
    """The same replay on the GPU (cuBLAS bf16 GEMMs, Triton Hessian kernel): fp32 block outputs
    equal the CPU's to fp32 rounding; the bf16 Hessians agree to bf16 rounding (routing may flip
    at near ties, so counts are compared in total)."""
    ckpt, store, block = setup
    hidden, tok, pos, lens = _all_rows(store)
    lens = lens if mode == "full" else None
    X32c, ids32c, _ = load_block(ckpt, device="cpu", dtype=torch.float32).moe_inputs(hidden, tok, pos, mode, lens)
    X32g, ids32g, _ = load_block(ckpt, device="cuda", dtype=torch.float32).moe_inputs(hidden, tok, pos, mode, lens)
    assert (X32g.cpu() - X32c).abs().max().item() < 1e-3
    assert (ids32g.cpu().sort(-1).values == ids32c.sort(-1).values).all(-1).float().mean() > 0.99
    gpu = load_block(ckpt, device="cuda")
    c = accumulate_hessians(block, [store], ReplayConfig(mode=mode, device="cpu"))
    g = accumulate_hessians(gpu, [store], ReplayConfig(mode=mode, device="cuda"))
    moved = (c.tokens_per_expert - g.tokens_per_expert).abs().sum().item()
    assert moved <= 0.02 * c.rows * block.spec.topk
    for name in ("h_in", "h_mid"):
        hc, hg = getattr(c, name).h, getattr(g, name).h.cpu()
        rel = ((hg - hc).norm() / hc.norm()).item()
        print(f"{mode} {name}: relative Frobenius CPU vs CUDA {rel:.2e}, routing pairs moved {moved}")
        assert rel < 3e-2

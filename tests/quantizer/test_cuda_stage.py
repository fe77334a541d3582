"""The quantize stage's GPU-only paths (skipped without CUDA; run on the GPU machine):
one worker through the spawned-process runner with the NCCL reduction (world size 1) writes the
shard the in-process run writes, and a worker that owns an expert slice — its experts selected
from the stacked weights by an index on the GPU (``worker._weights_for_gptq``) — quantises
them exactly as the whole-stack run does."""
import hashlib

import pytest
import torch

from requant.quantizer.mtp.arch import load_block
from requant.quantizer.stage.worker import _weights_for_gptq
from requant.quantizer.core.hessian import HessianSet
from requant.quantizer.core.experts import ExpertQuantConfig, pooled_hessian, quantize_experts
from requant.quantizer.stage.replay import ReplayConfig, accumulate_hessians
from requant.quantizer.stage.run import QuantizeJob, run_quantize

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the GPU machine)")


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_dsv4, dsv4_capture, tiny_dsv4_base):
    return tmp_path_factory.mktemp("cuda_stage"), tiny_dsv4, dsv4_capture, tiny_dsv4_base


def _shard_sha(out) -> str:
    return hashlib.sha256((out / "model-mtp-w4a16.safetensors").read_bytes()).hexdigest()


def _restrict(hs: HessianSet, experts: list[int]) -> HessianSet:
    """The owner's view after the reduce: only its slice's Hessians."""
    out = HessianSet(hs.num_experts, hs.dim, hs.device, experts=torch.tensor(experts))
    out.h, out.count = hs.h[experts].clone(), hs.count[experts].clone()
    return out


def test_cuda_nccl_process_runner_writes_the_in_process_shard(env):
    d, ckpt, store, base = env
    job = dict(stores=[store], master=str(ckpt), base=str(base), replay="full", device="cuda", holdout=0.2)
    local = run_quantize(QuantizeJob(out=str(d / "local"), **job), progress=False)
    procs = run_quantize(QuantizeJob(out=str(d / "procs"), processes=True, use_ray=False, **job), progress=False)
    assert _shard_sha(local.out) == _shard_sha(procs.out)


def test_cuda_expert_slice_selected_on_the_gpu_quantises_as_the_whole_stack(env):
    _, ckpt, store, _ = env
    block = load_block(ckpt, device="cuda")
    n = block.spec.n_experts
    mine = list(range(n // 2, n))
    cfg = ExpertQuantConfig(name_fn=block.spec.expert_name, batch_size=len(mine), device="cuda")
    full = accumulate_hessians(block, [store], ReplayConfig(device="cuda"))
    part = [_restrict(hs, mine) for hs in (full.h_in, full.h_mid)]
    w1, w2, w3, rows = _weights_for_gptq(block, mine, "cuda")
    assert w1.is_cuda and w1.shape[0] == len(mine) and rows == {e: i for i, e in enumerate(mine)}
    assert torch.equal(w1.cpu(), block.expert_weights()[0][mine].cpu())
    whole, _ = quantize_experts(*block.expert_weights(), full.h_in, full.h_mid, cfg)
    # a slice's shrink policy pools over all experts: the pooled Hessians of the whole sets, as the stage passes
    sliced, records = quantize_experts(w1, w2, w3, *part, cfg, rows=rows,
                                       pooled=(pooled_hessian(full.h_in), pooled_hessian(full.h_mid)))
    assert sorted({r.expert for r in records}) == mine
    assert sliced and set(sliced) <= set(whole)
    for k, t in sliced.items():
        assert torch.equal(t, whole[k]), k

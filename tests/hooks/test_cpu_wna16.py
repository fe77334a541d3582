"""The CPU W4A16 MoE forward (hooks/cpu_wna16.py) as vLLM's compiled serving sees it: a torch
custom op that torch.compile traces whole (fullgraph) although the per-expert loop inside sizes
tensors by routing counts, with the eager forward's numbers."""
import torch

from requant.hooks import cpu_wna16


def test_moe_op_traces_fullgraph_and_matches_the_eager_forward():
    op = cpu_wna16._define_op() if not hasattr(torch.ops.requant, "cpu_wna16_moe") else torch.ops.requant.cpu_wna16_moe
    g = torch.Generator().manual_seed(0)
    E, H, I, T, k = 4, 32, 16, 10, 2
    hidden = torch.randn(T, H, generator=g).bfloat16()
    w13 = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).bfloat16()
    w2 = (torch.randn(E, H, I, generator=g) / I ** 0.5).bfloat16()
    ids = torch.randint(0, E, (T, k), generator=g, dtype=torch.int32)
    weights = torch.rand(T, k, generator=g)

    def layer(x, ids, weights):
        return op(x, w13, w2, weights, ids, None) * 2

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=True)
    want = cpu_wna16.moe_forward(hidden, w13, w2, weights, ids) * 2
    assert torch.equal(compiled(hidden, ids, weights), want)
    # another routing (other per-expert counts): no retrace problem, same numbers as eager
    ids2 = torch.zeros_like(ids)
    assert torch.equal(compiled(hidden, ids2, weights), cpu_wna16.moe_forward(hidden, w13, w2, weights, ids2) * 2)

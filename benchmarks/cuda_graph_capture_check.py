"""Correctness of capture under CUDA graphs (run on the GPU machine; CI has no GPU, the GPU
machine has no vLLM): the mechanism the plugin uses for an in-forward capture point on
vLLM's NVIDIA DeepSeek-V4 tree, with everything but vLLM real.

A module whose forward calls a module-level "kernel" through its Python module's namespace
— as vLLM's DeepseekV4Model.forward calls hc_head_fused_kernel_tilelang — is hooked by
``requant.hooks.attach`` (a ``call`` ref, rows emitted after the forward from the stash),
its forward captured in a ``torch.cuda.CUDAGraph`` and replayed with new inputs, like
vLLM's CUDA-graph decode. Python (the hook) runs only during capture; the check is that
every replay's rows still reach ``on_rows``, equal to that replay's kernel input, bit for
bit, and that a call with another module's parameters is not taken.

    python benchmarks/cuda_graph_capture_check.py          # GPU
    python benchmarks/cuda_graph_capture_check.py --cpu    # the same steps eagerly (no graph), a dry run
"""
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _path import ensure_requant  # noqa: E402

ensure_requant()
from requant.hooks.attach import attach  # noqa: E402
from requant.hooks.points import CapturePoint, TensorRef  # noqa: E402

HC, D, T = 4, 4096, 64

# A Python module standing in for vllm.models.deepseek_v4.nvidia.model: its forward calls
# the kernel by its global name.
ns = types.ModuleType("graph_check_model")
exec('''
import torch

def head_kernel(x, fn, scale, base, eps, hc_eps):  # plain torch, the hc_head math
    t, n, d = x.shape
    r = x.reshape(t, n * d).float()
    mix = (r @ fn.t()) * torch.rsqrt(r.square().mean(-1, keepdim=True) + eps)
    pre = torch.sigmoid(mix * scale[0] + base) + hc_eps
    return (pre.unsqueeze(-1) * x.float()).sum(1).to(x.dtype)

class Model(torch.nn.Module):
    def __init__(self, hc, d):
        super().__init__()
        self.hc_head_fn = torch.nn.Parameter(torch.randn(hc, hc * d) * 0.01, requires_grad=False)
        self.hc_head_scale = torch.nn.Parameter(torch.ones(1), requires_grad=False)
        self.hc_head_base = torch.nn.Parameter(torch.zeros(hc), requires_grad=False)
        self.other_fn = torch.nn.Parameter(torch.randn(hc, hc * d) * 0.01, requires_grad=False)

    def forward(self, x):
        y = (x * 2).contiguous()  # the "layers"
        head_kernel(y + 1, self.other_fn, self.hc_head_scale, self.hc_head_base, 1e-6, 1e-6)  # another caller
        return head_kernel(y, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, 1e-6, 1e-6)

class Root(torch.nn.Module):
    def __init__(self, hc, d):
        super().__init__()
        self.model = Model(hc, d)

    def forward(self, input_ids, positions, x):
        return self.model(x)
''', ns.__dict__)
ns.Model.__module__ = ns.Root.__module__ = ns.__name__
sys.modules[ns.__name__] = ns


def main() -> int:
    eager = "--cpu" in sys.argv  # dry run of this script's logic without a GPU: no graph, eager forwards
    assert eager or torch.cuda.is_available()
    dev = torch.device("cpu" if eager else "cuda")
    root = ns.Root(HC, D).to(dev)
    kernel = ns.head_kernel
    point = CapturePoint("target_pre_head", "vllm", "Check", "target",
                         hidden=(TensorRef("model", "Model", "call", index=0, name="head_kernel",
                                           bound=(1, "hc_head_fn")),),
                         input_ids=TensorRef("", "Root", "input", kwarg="input_ids", index=0),
                         positions=TensorRef("", "Root", "input", kwarg="positions", index=1), hc_mult_key="hc")
    got = []
    att = attach(point, root, lambda h, ids, pos: got.append((h.clone(), ids.clone(), pos.clone())), HC * D,
                 boundary=True, stash_rows=T, dtype=torch.bfloat16, device=dev)
    static_x = torch.zeros(T, HC, D, device=dev, dtype=torch.bfloat16)
    ids = torch.arange(T, device=dev)
    pos = torch.arange(T, device=dev)
    if eager:
        replay = lambda: root(input_ids=ids, positions=pos, x=static_x)  # noqa: E731
        static_out = replay()
    else:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up off the graph, as vLLM's dummy runs
            root(input_ids=ids, positions=pos, x=static_x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = root(input_ids=ids, positions=pos, x=static_x)
        replay = graph.replay
    writes_at_capture = att.stash_writes
    ok = True
    for step in range(5):
        x = torch.randn(T, HC, D, device=dev).bfloat16()
        static_x.copy_(x)
        out = replay()  # a graph replay runs no Python of the model
        att.after_forward((), {"input_ids": ids, "positions": pos}, static_out if out is None else out)
        rows = got[-1][0]
        want = (x * 2).reshape(T, HC * D)
        same = torch.equal(rows, want)
        ok &= same
        print(f"replay {step}: rows == kernel input of this replay: {same}")
    if not eager:
        ok &= att.stash_writes == writes_at_capture  # replays ran no hook: the copy was in the graph
    att.remove()
    ok &= ns.head_kernel is kernel
    print(f"stash writes in Python: {att.stash_writes} (on the GPU: warm-up + capture; replays add none)")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Run by test_dsv4.py in its own process: build vLLM's real DeepSeek-V4 module trees of every
platform (nvidia, amd, xpu, cpu — on the meta device, see requant.testing.vllm_meta) from the tiny
fixture's config, with and without MTP speculative decoding, and resolve every declared vLLM
capture point on each; collect the start-up errors of trees that match nothing; and drive
the NVIDIA point's function-level hook the way DeepseekV4Model.forward calls the kernel.
argv: MODEL PORT OUT. Prints RESULT {json}; the hook test writes stores under OUT."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch


def plain_torch_hc_head(x, fn, scale, base, eps, hc_eps):
    """Plain-torch stand-in for vLLM's CUDA-only hc_head_fused_kernel_tilelang (the hc_head
    math: a learned per-stream gate, then the weighted sum of the hc_mult streams)."""
    t, n, d = x.shape
    r = x.reshape(t, n * d).float()
    mix = (r @ fn.float().t()) * torch.rsqrt(r.square().mean(-1, keepdim=True) + eps)
    pre = torch.sigmoid(mix * scale[0] + base) + hc_eps
    return (pre.unsqueeze(-1) * x.float()).sum(1).to(x.dtype)


def _desc(mods):
    return [f"{type(m).__module__}.{type(m).__name__}" for m in mods]


def resolve_points(model: str, port: int) -> tuple[dict, dict]:
    from requant.hooks.points import CapturePointError, find_point, resolve, resolve_hidden, row_shape
    from requant.testing.vllm_meta import TREES, build, engine_config, init_distributed, tree_class

    from requant.hooks.plugin import compile_refusal

    configs = {"plain": engine_config(model, spec=False), "spec": engine_config(model, spec=True)}
    init_distributed(configs["spec"], port)
    arch = configs["spec"].model_config.architectures[0]
    res, trees = {"arch": arch, "target": {}, "mtp": {}, "errors": {}}, {}
    for plat in TREES:
        for label, vc in configs.items():
            tree = trees[plat, label] = build(vc, tree_class(plat, "target"))
            point = find_point("target_pre_head", "vllm", arch, type(tree).__module__)
            ref, mods = resolve_hidden(point, tree, "hidden")
            res["target"][f"{plat}/{label}"] = {
                "hidden": [ref.io, ref.module, ref.cls, ref.name], "hidden_found": _desc(mods),
                "input_ids": _desc(resolve(point.input_ids, tree, "ids")),
                "positions": _desc(resolve(point.positions, tree, "positions")),
                "row": row_shape(point, vc.model_config.hf_config)}
        vc = configs["spec"]
        try:
            mtp = trees[plat, "mtp"] = build(vc, tree_class(plat, "mtp"), vc.speculative_config.draft_model_config)
        except NotImplementedError as e:  # vLLM's CPU tree: an MTP stub
            res["mtp"][plat] = {"not_built": str(e)}
            try:
                find_point("mtp_input", "vllm", arch, tree_class(plat, "mtp").__module__)
            except CapturePointError as e2:
                res["mtp"][plat]["find_point"] = str(e2)
            continue
        point = find_point("mtp_input", "vllm", arch, type(mtp).__module__)
        ref, mods = resolve_hidden(point, mtp, "hidden")
        res["mtp"][plat] = {"hidden": [ref.io, ref.module, ref.cls, ref.kwarg], "hidden_found": _desc(mods),
                            "input_ids": _desc(resolve(point.input_ids, mtp, "ids")),
                            "positions": _desc(resolve(point.positions, mtp, "positions")),
                            "ids_offset": point.ids_offset, "row": row_shape(point, vc.model_config.hf_config)}
    # Compilation on (no --enforce-eager): which trees' target point the plugin refuses. vLLM
    # turns on breakable CUDA graphs for DSV4 by default, which sets compilation mode none;
    # VLLM_USE_BREAKABLE_CUDAGRAPH=0 opts out, and then vLLM torch.compiles the CPU tree's model.
    # (No JIT-kernel warm-up: registering it imports tilelang, a CUDA-only package; eager mode
    # skips it too.)
    os.environ["VLLM_USE_BREAKABLE_CUDAGRAPH"] = "0"
    compiled = engine_config(model, spec=False, eager=False, kernel_config={"enable_jit_warmup": False})
    res["compiled"] = {"mode": compiled.compilation_config.mode.name}
    for plat in ("nvidia", "cpu"):
        tree = build(compiled, tree_class(plat, "target"))
        point = find_point("target_pre_head", "vllm", arch, type(tree).__module__)
        ref, _ = resolve_hidden(point, tree, "hidden")
        res["compiled"][plat] = compile_refusal("target_pre_head", ref, tree, compiled.compilation_config.mode)
    res["compiled"]["spec_buffer"] = compile_refusal("target_pre_head", find_point(
        "target_pre_head", "vllm", arch, "vllm.models.deepseek_v4.cpu.model").hidden[0], trees["cpu", "spec"],
        compiled.compilation_config.mode)
    # Start-up errors: a tree that matches no declared place, an undeclared tree.
    nvidia = find_point("target_pre_head", "vllm", arch, "vllm.models.deepseek_v4.nvidia.model")
    for name, call in (("nvidia_point_on_cpu_tree", lambda: resolve_hidden(nvidia, trees["cpu", "plain"], "hidden")),
                       ("undeclared_tree", lambda: find_point("target_pre_head", "vllm", arch,
                                                              "vllm.models.deepseek_v4.tpu.model"))):
        try:
            call()
            res["errors"][name] = None
        except CapturePointError as e:
            res["errors"][name] = str(e)
    # A DSV4 checkpoint without mtp.0.*: vLLM's NVIDIA MTP loader refuses it at load.
    from safetensors.torch import load_file
    target_only = {k: v for k, v in load_file(str(Path(model) / "model.safetensors")).items()
                   if not k.startswith("mtp.")}
    try:
        trees["nvidia", "mtp"].load_weights(iter(target_only.items()))
        res["errors"]["mtp_weights_missing"] = None
    except ValueError as e:
        res["errors"]["mtp_weights_missing"] = str(e)
    return res, trees


def function_hook(tree, out: Path, hidden_size: int, hc: int) -> dict:
    """The NVIDIA point's hook on the real module: the kernel is called as DeepseekV4Model.forward
    calls it (through vllm.models.deepseek_v4.nvidia.model's namespace, with the model's own
    hc_head parameters); rows are emitted after the "forward" as the plugin does."""
    import vllm.models.deepseek_v4.nvidia.model as nv

    from requant.capture import Capturer
    from requant.hooks.attach import attach
    from requant.hooks.points import find_point
    from requant.storage import CaptureStore, StoreMeta

    m = tree.model  # DeepseekV4Model; its three hc_head parameters made real for the stand-in
    g = torch.Generator().manual_seed(0)
    for name, shape in (("hc_head_fn", (hc, hc * hidden_size)), ("hc_head_base", (hc,)), ("hc_head_scale", (1,))):
        setattr(m, name, torch.nn.Parameter(torch.randn(*shape, generator=g) * 0.1, requires_grad=False))
    nv.hc_head_fused_kernel_tilelang = plain_torch_hc_head  # what the namespace holds instead of the kernel
    point = find_point("target_pre_head", "vllm", "DeepseekV4ForCausalLM", type(tree).__module__)
    width = hidden_size * hc
    # Two requests: a prefill of 5 and 3 tokens, then two decode steps padded to 4 rows (as a
    # CUDA-graph batch size pads them).
    tokens = {"a": torch.randint(5, 400, (8,), generator=g).tolist(), "b": torch.randint(5, 400, (6,), generator=g).tolist()}
    steps = [(["a", "b"], [5, 3], [(0, 5), (0, 3)], 8), (["a", "b"], [1, 1], [(5, 6), (3, 4)], 4),
             (["a", "b"], [1, 1], [(6, 7), (4, 5)], 4)]
    expected = {r: [] for r in tokens}
    result = {}

    def run(tag: str, att, record: bool) -> Capturer:
        store = CaptureStore.create(str(out / tag), StoreMeta(hidden_size=hidden_size, hc_mult=hc))
        cap = Capturer(store.writer("w0"), width=width, rows_per_step=8)
        handle = {"cap": cap}
        att.on_rows = lambda h, ids, pos: handle["cap"].add_step(*handle["layout"], h, ids, pos)
        for req_ids, counts, spans, padded in steps:
            ids = torch.tensor([t for r, (s, e) in zip(req_ids, spans) for t in tokens[r][s:e]])
            pos = torch.tensor([p for s, e in spans for p in range(s, e)])
            ids = torch.cat([ids, ids.new_zeros(padded - len(ids))])
            pos = torch.cat([pos, pos.new_zeros(padded - len(pos))])
            x = torch.randn(padded, hc, hidden_size, generator=g).bfloat16()
            # DeepseekV4Model.forward: hidden_states = hc_head_fused_kernel_tilelang(hidden_states,
            #   self.hc_head_fn, self.hc_head_scale, self.hc_head_base, self.rms_norm_eps, self.hc_eps)
            y = nv.hc_head_fused_kernel_tilelang(x, m.hc_head_fn, m.hc_head_scale, m.hc_head_base,
                                                 m.rms_norm_eps, m.hc_eps)
            result.setdefault(f"{tag}_transparent", True)
            result[f"{tag}_transparent"] &= torch.equal(y, plain_torch_hc_head(
                x, m.hc_head_fn, m.hc_head_scale, m.hc_head_base, m.rms_norm_eps, m.hc_eps))
            # another caller of the same function (other parameters) is not this model's call
            nv.hc_head_fused_kernel_tilelang(torch.randn_like(x.float()).bfloat16(), m.hc_head_fn.clone(),
                                             m.hc_head_scale, m.hc_head_base, m.rms_norm_eps, m.hc_eps)
            if record:
                start = 0
                for r, n in zip(req_ids, counts):
                    expected[r].append(x[start:start + n].reshape(n, width))
                    start += n
            handle["layout"] = (req_ids, counts)
            att.after_forward((), {"input_ids": ids, "positions": pos}, y)
        return cap

    att = attach(point, tree, None, width, boundary=True, stash_rows=8, dtype=torch.bfloat16, device="cpu")
    result["hooked_while_attached"] = nv.hc_head_fused_kernel_tilelang is not plain_torch_hc_head
    cap = run("hooked", att, record=True)
    result["stash_writes"] = att.stash_writes
    for r, t in tokens.items():
        cap.finish(r, t)
    cap.close()
    result["hooked_stats"] = cap.stats.as_dict()
    np.savez(out / "expected.npz", **{r: torch.cat(v).view(torch.int16).numpy() for r, v in expected.items()})
    result["tokens"] = tokens

    att.remove()
    result["restored"] = nv.hc_head_fused_kernel_tilelang is plain_torch_hc_head
    before = att.stash.clone()
    cap = run("removed", att, record=False)
    cap.close()
    result["stash_untouched_after_remove"] = torch.equal(before, att.stash)
    result["removed_stats"] = cap.stats.as_dict()
    return result


def main() -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    model, port, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    res, trees = resolve_points(model, port)
    cfg = json.loads((Path(model) / "config.json").read_text())
    res["function_hook"] = function_hook(trees["nvidia", "plain"], out, cfg["hidden_size"], cfg["hc_mult"])
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()

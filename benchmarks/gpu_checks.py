"""Correctness of the CUDA paths (run on the GPU machine; CI has no GPU):
the Triton in-block kernel against the torch column loop on the same device and
against the float64 reference, for static, dynamic and act-order groups."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "quantizer"))
from _path import ensure_requant  # noqa: E402

ensure_requant()
from reference import gptq_reference  # noqa: E402
from requant.quantizer.core.gptq import GPTQConfig, gptq_batched  # noqa: E402
from requant.quantizer.core.hessian import HessianSet  # noqa: E402


def main():
    assert torch.cuda.is_available()
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(0)
    B, R, C, T = 6, 512, 1024, 8192
    basis = torch.randn(C, C, device="cuda", generator=g) / C ** 0.5 * torch.logspace(0, -3, C, device="cuda")
    x = (torch.randn(B * T, C, device="cuda", generator=g) @ basis.T).bfloat16()
    hs = HessianSet(B, C, device="cuda")
    hs.add(x, torch.arange(B, device="cuda").repeat_interleave(T))
    xf = x.float()
    ref = torch.stack([xf[i * T:(i + 1) * T].T @ xf[i * T:(i + 1) * T] for i in range(B)])
    print("hessian add() vs fp32 recipe max rel diff",
          max(float((hs.h[i] - ref[i]).norm() / ref[i].norm()) for i in range(B)))
    h = hs.mean()
    # Accuracy at a large token count (one expert, 120k tokens, d=4096) against float64.
    xb = (torch.randn(120_000, 4096, device="cuda", generator=g) @ (torch.randn(4096, 4096, device="cuda", generator=g)
          / 64 * torch.logspace(0, -3, 4096, device="cuda"))).bfloat16()
    h64 = xb.double().T @ xb.double()
    for backend in ("triton", "cublas"):
        big = HessianSet(1, 4096, device="cuda", backend=backend)
        big.add_segments(xb, torch.tensor([xb.shape[0]]))
        print(f"hessian {backend} 120k tokens vs fp64: {float((big.h[0].double() - h64).norm() / h64.norm()):.2e}")
    xf = xb.float()
    print(f"hessian fp32 recipe 120k tokens vs fp64: {float((xf.T @ xf - h64).norm() / h64.norm()):.2e}")
    del xb, h64, xf, big
    w = torch.randn(B, R, C, device="cuda", generator=g) * 0.02
    ok = True
    for name, kw in (("static", {}), ("dynamic", {"dynamic_groups": True}), ("actorder", {"act_order": True})):
        # fp32 lazy updates here: this checks the kernel, not TF32 (the benchmark measures that).
        rt = gptq_batched(w, h, GPTQConfig(use_triton=True, tf32_update=False, **kw))
        rp = gptq_batched(w, h, GPTQConfig(use_triton=False, tf32_update=False, **kw))
        same = (rt.q == rp.q).float().mean().item()
        rr = gptq_reference(w[0].cpu(), h[0].cpu(), static_groups=not kw.get("dynamic_groups", False),
                            act_order=kw.get("act_order", False))
        same_ref = (rt.q[0].cpu() == rr[0]).float().mean().item()
        scale_same = torch.equal(rt.scale, rp.scale)
        print(f"{name}: triton==torch ints {same:.6f}, scales equal {scale_same}, triton==fp64 ref {same_ref:.6f}, "
              f"loss rel diff {float(((rt.loss - rp.loss).abs() / rp.loss).max()):.2e}")
        # The dynamic variant takes scales from partially compensated weights, which differ
        # from the reference's (see gptq.py): compare its integers with the torch path only.
        ok &= same > 0.999 and (same_ref > 0.99 or name == "dynamic")
    print("GPU CHECKS", "PASS" if ok else "FAIL")


if __name__ == "__main__":
    main()

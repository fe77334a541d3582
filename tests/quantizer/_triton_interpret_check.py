"""Run by test_triton_kernels.py in a subprocess with TRITON_INTERPRET=1: the CUDA
kernels executed by Triton's CPU interpreter against the torch code paths."""
import torch

from requant.quantizer.core.gptq import GPTQConfig, _block_torch, _permute_cols, _prepare
from requant.quantizer.core.gptq_triton import block_kernel
from requant.quantizer.core.hessian_triton import grouped_syrk_
from requant.quantizer.core.quant import group_scales

torch.manual_seed(0)
B, R, C = 2, 32, 256
x = torch.randn(B, 2000, C) @ (torch.randn(C, C) * torch.logspace(0, -3, C)[None])
h = x.mT @ x
w = torch.randn(B, R, C) * 0.02
for kw in ({}, {"dynamic_groups": True}, {"act_order": True}):
    cfg = GPTQConfig(**kw)
    hh, w0, gidx = h, w, None
    if cfg.act_order:
        perm = torch.argsort(h.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True)
        w0, gidx = _permute_cols(w, perm), (perm // 128).contiguous()
        hh = torch.gather(torch.gather(h, 1, perm[:, :, None].expand(-1, -1, C)), 2, perm[:, None, :].expand(-1, C, -1))
    v, _, _, _ = _prepare(hh, cfg)
    sa, sb = group_scales(w, cfg.spec), group_scales(w, cfg.spec)
    wa, wb = w0.clone(), w0.clone()
    for b0 in (0, 128):
        qa, da = torch.zeros(B, R, C, dtype=torch.int8), torch.zeros(B, R, 128)
        qb, db = torch.zeros(B, R, C, dtype=torch.int8), torch.zeros(B, R, 128)
        la = _block_torch(wa, w0, v, sa, gidx, b0, b0 + 128, cfg, qa[:, :, b0:b0 + 128], da)
        lb = block_kernel(wb, w0, v, sb, gidx, b0, b0 + 128, cfg, qb[:, :, b0:b0 + 128], db)
        assert torch.equal(qa, qb), (kw, b0, (qa == qb).float().mean())
        assert torch.allclose(da, db, atol=1e-6), kw
        assert torch.allclose(la, lb, rtol=1e-4), kw
        if b0 == 0:  # feed the next block exactly as gptq_batched does
            wa[:, :, 128:] += da @ v[:, :128, 128:]
            wb[:, :, 128:] += db @ v[:, :128, 128:]
    assert torch.equal(sa, sb), kw
    print("gptq kernel ok", kw)

xs = torch.randn(700, 256).half()  # the interpreter's tl.dot mishandles bf16; fp16 takes the same path
counts = torch.tensor([0, 300, 400])
ref = torch.stack([torch.zeros(256, 256, dtype=torch.float64),
                   xs[:300].double().T @ xs[:300].double(), xs[300:].double().T @ xs[300:].double()])
for flat in (False, True):
    hk = torch.zeros(3, 256, 256)
    grouped_syrk_(hk, xs, counts, bm=128, bk=32, promote=2, flat=flat)
    err = float((hk.double() - ref).norm() / ref.norm())
    assert err < 1e-6, (flat, err)
print("syrk kernel ok", err)

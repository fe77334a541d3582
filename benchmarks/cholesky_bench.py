"""Batched UL Cholesky (V·Vᵀ = H, V upper) of DSV4-sized damped Hessians [B, 4096, 4096]:
through cuSOLVER (torch's default; MAGMA) and requant's blocked variant; time and
backward error ‖VVᵀ−H‖/‖H‖."""
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _path import ensure_requant  # noqa: E402

ensure_requant()
from requant.quantizer.core.gptq import ul_cholesky  # noqa: E402


def main():
    B, n, T = int(os.environ.get("B", 32)), 4096, 16384
    g = torch.Generator(device="cuda").manual_seed(0)
    basis = torch.randn(n, n, device="cuda", generator=g) / n ** 0.5 * torch.logspace(0, -3, n, device="cuda")
    h = torch.empty(B, n, n, device="cuda")
    for b in range(B):
        x = torch.randn(T, n, device="cuda", generator=g) @ basis.T
        h[b] = x.T @ x / T
    h.diagonal(dim1=-2, dim2=-1).add_(0.01 * h.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True))
    out = {"device": torch.cuda.get_device_name(), "batch": B, "n": n}

    def run(name, fn):
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        low, info = fn()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        err = max(float((low[b].double().triu() @ low[b].double().triu().T - h[b].double()).norm() / h[b].double().norm())
                  for b in range(0, B, max(1, B // 4)))
        out[name] = {"seconds": dt, "ms_per_matrix": dt / B * 1e3, "backward_err": err, "failed": int((info != 0).sum())}
        print(f"{name:24s} {dt * 1e3:8.1f} ms  ({dt / B * 1e3:.2f} ms/matrix)  ‖LLᵀ−H‖/‖H‖ {err:.2e}", flush=True)

    run("cusolver", lambda: ul_cholesky(h, 0))
    try:
        torch.backends.cuda.preferred_linalg_library("magma")
        run("magma", lambda: ul_cholesky(h, 0))
    except Exception as e:  # noqa: BLE001
        print("magma unavailable:", e)
    torch.backends.cuda.preferred_linalg_library("default")
    for nb in (256, 512, 1024, 2048):
        run(f"blocked{nb}", lambda nb=nb: ul_cholesky(h, nb))
    Path(os.environ.get("OUT", "."), "cholesky.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""Plain float64 GPTQ written straight from the paper / IST-DASLab reference (one matrix,
the reference's cholesky_inverse + upper Cholesky path). Test oracle only."""
import torch


def gptq_reference(w, h, group=128, block=128, damp=0.01, static_groups=True, act_order=False):
    w = w.double().clone()
    h = h.double().clone()
    rows, cols = w.shape

    def scale_of(x):  # [R, g] → [R]
        absmax = torch.maximum(x.amax(1).clamp(min=0), (-x.amin(1)).clamp(min=0))
        s = (absmax / 7.5).to(torch.bfloat16).double()
        return torch.where(s == 0, torch.tensor(2.0 ** -7, dtype=torch.float64), s)

    static = torch.stack([scale_of(w[:, g:g + group]) for g in range(0, cols, group)], 1)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    scales = static.clone()
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, err1, h1 = w[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, dtype=torch.float64), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not static_groups and col % group == 0:
                scales[:, col // group] = scale_of(w1[:, i:i + group])
            g = (perm[col] if perm is not None else col) // group
            s = scales[:, g]
            qi = torch.clamp(w1[:, i] / s, -8, 7).round()
            e = (w1[:, i] - qi * s) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            q[:, col] = qi
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return q.to(torch.int8), scales.float()

"""Per-worker memory of the quantize stage: an estimate of each step's peak from the plan
(torch-free: it needs shapes and counts only) and the check that refuses, before any work, a
plan the worker's memory limit cannot hold.

What a worker holds (bytes; E experts, D hidden, I moe_inter, T(d) = d(d+1)/2):

* the block: the master's MTP weights in bf16 (routed experts 6·E·I·D) and the embedding,
  for the whole stage; while loading, the experts once more (per-expert tensors → stacks);
* replaying: the int64 sums of every expert it accumulates (data-parallel: all E) as upper
  triangles, 8·E·(T(D)+T(I)); one fp32 partial of FOLD_EXPERTS experts, 4·F·(D²+I²); the
  fold window (≤ FOLD_ROWS rows of MoE inputs and routing); the block's activations per call;
  and the fp32 packed Hessians of its slice from earlier passes, 4·own·(T(D)+T(I)) each;
* GPTQ: its slice's packed Hessians of the passes it uses (calibration, held-out) plus a
  batch's working set (``gptq_entry_bytes`` per w1/w3 entry) — the batch is unpacked to full
  matrices only there.

The activations are scaled from one measurement (DSV4-Flash, one H100, 16,384 rows per call:
~18 GiB besides the Hessians and weights); the rest is counted. On a GPU the limit is the
device's memory (earlier passes' Hessians may move to the host: ``parkable``); on a CPU it is
host memory and includes the store rows being read (``max_bytes``).
"""
from __future__ import annotations

from dataclasses import dataclass

from requant.quantizer.core.limits import FOLD_EXPERTS

GIB = 1 << 30
ACT_BYTES = 18 * GIB / (16384 * 4096)   # block activations per row and hidden unit (measured, above)
CUDA_CONTEXT = 1 << 30                  # CUDA context, cuBLAS/Triton workspaces: outside the allocator
PROCESS = 1 << 29                       # host: Python, torch and its libraries (a worker's RSS, rounded up)
FOLD_TEMP_EXPERTS = 4                   # hessian.FixedPointSum chunk: packed fp32 + int64 per expert


def tri(d: int) -> int:
    return d * (d + 1) // 2


def gptq_bytes(rows: int, cols: int) -> int:
    """GPTQ's fp32 working set per batch entry [rows, cols]: weights, integers, per-column
    scales, block errors, error metric buffers (~6 R×C), H, U, factorisation scratch (~4 C×C)."""
    return 4 * (6 * rows * cols + 4 * cols * cols)


def gptq_entry_bytes(hidden: int, inter: int) -> int:
    """``gptq_bytes`` per expert of a batch: its w1+w3 entry [2I, D], the larger one."""
    return gptq_bytes(2 * inter, hidden)


@dataclass(frozen=True)
class Shapes:
    experts: int
    hidden: int
    inter: int
    topk: int
    block_bytes: int         # the block's weights on the worker's device (bf16 stacks, embedding, the rest)
    expert_bytes: int        # of which the routed experts' stacks


def estimate(sh: Shapes, phases: list[tuple[str, str]], accumulate: int, own: int, batch: int,
             rows_per_call: int, window_rows: int, gptq_batch: int, device: str,
             host_rows_bytes: int = 0) -> dict:
    """Peak bytes per step of one worker: ``phases`` (split, mode) in order, ``accumulate``
    experts in its replay sums (data-parallel: all), ``own`` experts it owns (its slice),
    ``batch`` experts per GPTQ batch (the sums' blocks), ``rows_per_call`` rows per block call,
    ``window_rows`` rows held in a fold window, ``gptq_batch`` experts per GPTQ step.
    Returns {"steps": {name: {"bytes", "parts"}}, "peak", "peak_step", "parkable"}."""
    E, D, I = sh.experts, sh.hidden, sh.inter
    cuda = device.startswith("cuda")
    packed_set = tri(D) + tri(I)
    base = {"block weights": sh.block_bytes} | ({"CUDA context": CUDA_CONTEXT} if cuda else {})
    if not cuda:
        base |= {"process (Python, torch)": PROCESS, "store rows being read": host_rows_bytes}
    steps: dict[str, dict] = {"load": {"parts": base | {"experts while stacking": sh.expert_bytes}}}
    replay = {"int64 sums (upper triangles)": 8 * accumulate * packed_set,
              "fp32 partial": 4 * min(FOLD_EXPERTS, batch, accumulate) * (D * D + I * I)
                              + 12 * FOLD_TEMP_EXPERTS * tri(D),
              "fold window": window_rows * (2 * D + 24 * sh.topk),
              "activations": int(ACT_BYTES * rows_per_call * D)}
    owned = 4 * own * packed_set
    earlier = 0
    for split, mode in phases:
        name = f"{split}/{mode}"
        steps[f"replay {name}"] = {"parts": base | replay | ({"earlier passes' Hessians": earlier} if earlier else {})}
        # the reduce: sums and the owned blocks being converted (int64 → fp32, freed as they go)
        steps[f"reduce {name}"] = {"parts": base | {"int64 sums (upper triangles)": 8 * accumulate * packed_set,
                                                      "conversion": 12 * FOLD_TEMP_EXPERTS * tri(D)}
                                   | ({"earlier passes' Hessians": earlier} if earlier else {})}
        earlier += owned
    if own:
        held = any(s == "heldout" for s, _ in phases)
        gptq = {"Hessians (calibration, held-out)": owned * (1 + held),
                "GPTQ batch": gptq_batch * gptq_entry_bytes(D, I),
                "packed rows being unpacked": gptq_batch * 4 * tri(D)}
        if cuda and own < E:  # the slice's experts gathered on the device for GPTQ
            gptq["slice's weights"] = 6 * own * I * D
        if any(s == "calibration" for s, _ in phases[:-1]):  # replay=both: identity vs full distance first
            steps["distance"] = {"parts": base | {"Hessians (all passes)": earlier,
                                                  "two unpacked chunks": 2 * 2 * 16 * 4 * D * D}}
        steps["gptq"] = {"parts": base | gptq}
    for st in steps.values():
        st["bytes"] = sum(st["parts"].values())
    peak = max(steps, key=lambda k: steps[k]["bytes"])
    parkable = {k: st["parts"].get("earlier passes' Hessians", 0) for k, st in steps.items()
                if k.startswith("replay ")} if cuda else {}
    return {"steps": steps, "peak": steps[peak]["bytes"], "peak_step": peak, "parkable": parkable}


class MemoryLimitError(ValueError):
    """The plan does not fit the worker's memory limit (raised before any work)."""


def check(est: dict, limit: int, source: str) -> None:
    """Refuse a plan whose estimated peak exceeds ``limit`` (what the limit is: ``source``);
    on a GPU the earlier passes' Hessians can wait on the host, so they do not count."""
    over = {}
    for name, st in est["steps"].items():
        need = st["bytes"] - est["parkable"].get(name, 0)
        if need > limit:
            over[name] = need
    if not over:
        return
    name = max(over, key=over.get)
    parts = {k: v for k, v in est["steps"][name]["parts"].items()
             if v and not (k == "earlier passes' Hessians" and name in est["parkable"])}
    shown = ", ".join(f"{k} {v / GIB:.3g}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))
    hints = {"activations": "fewer rows per block call (--max-rows)",
             "GPTQ batch": "a smaller GPTQ batch (gptq_batch)",
             "store rows being read": "less host memory for the store rows (--max-memory-gib)"}
    cut = [k for k in sorted(parts, key=parts.get, reverse=True) if k in hints]
    hint = (f"{hints[cut[0]]}, or " if cut else "") + "more memory per worker (every replaying worker holds the " \
        "int64 sums of all the experts it replays for)"
    raise MemoryLimitError(f"the plan needs ~{over[name] / GIB:.3g} GiB per worker at its peak ({name}: {shown} GiB) "
                           f"but the memory limit is {limit / GIB:.3g} GiB ({source}); try {hint}")

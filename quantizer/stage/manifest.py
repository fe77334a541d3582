"""The manifest of a quantize run (``requant-manifest.json``) and its summary: what was asked,
what it was made from, how the work was split, and per tensor what was written and how good
it is."""
from __future__ import annotations

import datetime as _dt
from dataclasses import asdict

from requant.quantizer.stage.provenance import versions
from requant.quantizer.stage.records import ReduceStep, ReplayStep, TensorResult, WorkerResult

FORMAT = "requant.quantize/2"

ERROR_DEFINITIONS = {
    "err_gptq": "in-sample: tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) of the written tensor on the calibration Hessian GPTQ fitted",
    "err_rtn": "in-sample: the same for round-to-nearest",
    "err_gptq_heldout": "held-out: the written tensor's error on the Hessian of the held-out prompts' sequences",
    "err_rtn_heldout": "held-out: the same for round-to-nearest",
    "heldout_not_below_rtn": "the written tensor's held-out error is not below RTN's (GPTQ did no good there)",
}


def worker_facts(results: list[WorkerResult], steps: list[ReplayStep | ReduceStep]) -> list[dict]:
    """Per worker: experts, device, the partitions it replayed per phase, rows, store bytes read."""
    out = []
    for r in results:
        mine = [st for st in steps if st.rank == r.rank and isinstance(st, ReplayStep)]
        out.append({"rank": r.rank, "experts": [r.experts[0], r.experts[-1]] if r.experts else [],
                    "device": r.device, "pid": r.pid,
                    "replay_pids": sorted({st.pid for st in mine}),
                    "partitions": {f"{st.split}/{st.mode}": st.partitions for st in mine if not st.catch_up},
                    "caught_up": sorted({f"{st.split}/{st.mode}" for st in mine if st.catch_up}),
                    "rows": sum(st.rows for st in mine), "bytes_read": sum(st.bytes_read for st in mine),
                    "bytes_reduced": sum(st.bytes_reduced for st in steps
                                         if st.rank == r.rank and isinstance(st, ReduceStep)),
                    "seconds": r.seconds})
    return out


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summary(job, spec, out, records: list[TensorResult], tokens, plan, task, workers, idle, use_ray, rows,
            timings) -> dict:
    """The run in a few figures (``run.format_summary`` prints it; the API returns it)."""
    heldout = bool(plan.heldout)
    held = [r.heldout for r in records if r.heldout]
    return {
        "out": str(out), "arch": spec.arch, "experts": spec.n_experts, "tensors": len(records),
        "rows": rows, "rows_calibration": plan.rows("calibration"), "rows_heldout": plan.rows("heldout"),
        "replay": job.replay, "workers": task.world, "ray": use_ray, "parallel": job.parallel,
        "partitions": len(plan.calibration), "partitions_heldout": len(plan.heldout),
        "idle_replay_workers": idle,
        "idle_gptq_workers": sum(not sl for sl in task.slices),
        "bytes_read_per_worker": [w["bytes_read"] for w in workers],
        "rows_per_worker": [w["rows"] for w in workers],
        "err_gptq_mean": _mean([r.record.err_gptq for r in records]),          # in-sample
        "err_rtn_mean": _mean([r.record.err_rtn for r in records]),            # in-sample
        "err_gptq_heldout_mean": _mean([h.err_gptq_heldout for h in held]) if heldout else None,
        "err_rtn_heldout_mean": _mean([h.err_rtn_heldout for h in held]) if heldout else None,
        "heldout_not_below_rtn": sum(r.not_below_rtn for r in records) if heldout else None,
        "under_covered": sum(t < job.min_tokens for t in tokens),
        "not_gptq": sum(r.path != "gptq" for r in records), "seconds_total": 0.0,
        "timings": timings,             # phase → seconds (same dict as the manifest's)
    }


def build(*, job, spec, inputs, stores, plan, phases, gptq, batch, merged, workers, memory, cluster, assembly,
          timings, summary) -> dict:
    """The manifest, keys in the order it is written."""
    records, tokens, quant_mode = merged.records, merged.tokens, merged.quant_mode
    cluster = asdict(cluster) if cluster else None
    return {
        "format": FORMAT,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "versions": versions() | ({"ray": cluster["ray"]} if cluster else {}),
        "job": job.model_dump(),
        "spec": asdict(spec),
        "inputs": inputs,
        "stores": stores,
        "replay": job.replay,
        "w2_weighting": job.w2_weighting,
        "partitions": plan.describe(),
        "phases": [asdict(p) for p in phases],
        "gptq": {"damp": job.damp, "act_order": job.act_order, "low_tokens": asdict(job.low_token_policy),
                 "block_size": gptq.block_size,
                 "group_size": gptq.spec.group_size, "num_bits": gptq.spec.num_bits, "symmetric": True,
                 "batch": batch, "damp_growth": gptq.damp_growth, "damp_max": gptq.damp_max},
        "error_definitions": ERROR_DEFINITIONS,
        "tokens_per_expert": tokens,
        "tokens_per_expert_identity": merged.by_phase.get(("calibration", "identity")) if job.replay == "both" else None,
        "tokens_per_expert_heldout": merged.by_phase.get(("heldout", quant_mode)),
        "hessian_distance": {str(e): list(v) for e, v in sorted(merged.distance.items())} or None,
        "tensors": [r.as_dict() for r in records],
        "errors": [{"tensor": r.name, "path": r.path, "tokens": r.record.tokens} for r in records if r.path != "gptq"],
        "heldout_not_below_rtn": [r.name for r in records if r.not_below_rtn],
        "workers": workers,
        "memory": memory,
        "cluster": cluster,
        "assembly": assembly,
        "timings": timings,
        "summary": summary,
    }

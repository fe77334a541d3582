"""Quality report of a quantize run: ``report.md`` plus PNG plots (matplotlib, Agg backend).

* tokens per expert, experts under ``min_tokens`` flagged (they are quantised anyway — GPTQ
  with few tokens, RTN with none — but their Hessian says little);
* GPTQ vs RTN relative output error tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) per tensor, held-out (H from the
  held-out prompts' sequences, which GPTQ never saw: the quality figure) and in-sample (H the
  calibration Hessian GPTQ fitted, labelled so); tensors whose held-out error is not below
  RTN's are listed;
* per worker: partitions replayed, rows, store bytes read;
* with ``replay=both``: per expert, the relative Frobenius distance ‖H̄_full − H̄_identity‖/‖H̄_full‖
  of the mean Hessians (what GPTQ consumes) — how much the attention sub-layer moves them.
"""
from __future__ import annotations

import math
from pathlib import Path

PLOT_TOKENS = "tokens_per_expert.png"
PLOT_ERRORS = "gptq_vs_rtn.png"
PLOT_HELDOUT = "heldout_gptq_vs_rtn.png"
PLOT_INSAMPLE_HELDOUT = "insample_vs_heldout.png"
PLOT_DISTANCE = "hessian_distance.png"


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_tokens(tokens: list[int], min_tokens: int, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 3.5))
    colors = ["#c0392b" if t < min_tokens else "#2e86c1" for t in tokens]
    ax.bar(range(len(tokens)), [max(t, 0.5) for t in tokens], color=colors, width=1.0)
    ax.axhline(min_tokens, color="#c0392b", ls="--", lw=1, label=f"min_tokens = {min_tokens}")
    ax.set_yscale("log")
    ax.set_xlabel("expert")
    ax.set_ylabel("routed tokens")
    ax.set_title(f"tokens per expert ({sum(t < min_tokens for t in tokens)} under-covered, red)")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_errors(records: list[dict], path: Path, x: str = "err_rtn", y: str = "err_gptq",
                xlabel: str = "RTN relative output error (in-sample)",
                ylabel: str = "GPTQ relative output error (in-sample)",
                title: str = "per tensor: GPTQ vs RTN, in-sample", diagonal: str = "GPTQ = RTN") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    lo, hi = math.inf, 0.0
    for proj, color in (("w1", "#2e86c1"), ("w2", "#c0392b"), ("w3", "#27ae60")):
        pts = [(r[x], r[y]) for r in records
               if r["proj"] == proj and r.get(x) and r.get(y) is not None and r[y] > 0]
        if pts:
            xs, ys = zip(*pts)
            ax.scatter(xs, ys, s=8, alpha=0.7, color=color, label=proj)
            lo, hi = min(lo, *xs, *ys), max(hi, *xs, *ys)
    if hi > 0:
        ax.plot([lo, hi], [lo, hi], color="gray", lw=1, ls="--", label=diagonal)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_distance(distance: dict[int, tuple[float, float]], path: Path) -> None:
    plt = _plt()
    ids = sorted(distance)
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.plot(ids, [distance[e][0] for e in ids], ".", label="w1/w3 input Hessian")
    ax.plot(ids, [distance[e][1] for e in ids], ".", label="w2 input Hessian")
    ax.set_xlabel("expert")
    ax.set_ylabel("‖H_full − H_identity‖ / ‖H_full‖")
    ax.set_title("identity vs full replay: relative Frobenius distance of the mean Hessians")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3e}"


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def _heldout_plots(records: list[dict], out: Path) -> None:
    plot_errors(records, out / PLOT_HELDOUT, "err_rtn_heldout", "err_gptq_heldout",
                "RTN relative output error (held-out)", "written (GPTQ) relative output error (held-out)",
                "per tensor: GPTQ vs RTN on held-out prompts")
    plot_errors(records, out / PLOT_INSAMPLE_HELDOUT, "err_gptq", "err_gptq_heldout",
                "GPTQ error in-sample (calibration Hessian)", "GPTQ error held-out",
                "per tensor: in-sample vs held-out GPTQ error", "held-out = in-sample")


def write_report(out: Path, manifest: dict, min_tokens: int) -> Path:
    """report.md and its plots in ``out`` from the manifest's contents."""
    tokens = manifest["tokens_per_expert"]
    records = manifest["tensors"]
    s = manifest["summary"]
    heldout = s.get("err_gptq_heldout_mean") is not None or bool(s.get("rows_heldout"))
    distance = {int(k): tuple(v) for k, v in (manifest.get("hessian_distance") or {}).items()}
    try:
        plot_tokens(tokens, min_tokens, out / PLOT_TOKENS)
        plot_errors(records, out / PLOT_ERRORS)
        if heldout:
            _heldout_plots(records, out)
        if distance:
            plot_distance(distance, out / PLOT_DISTANCE)
        plots = ""
    except ImportError:  # matplotlib missing (a bare GPU image): the tables still say it all
        plots = "(plots skipped: matplotlib is not installed)"
    under = [(e, t) for e, t in enumerate(tokens) if t < min_tokens]
    paths: dict[str, int] = {}
    for r in records:
        paths[r["path"]] = paths.get(r["path"], 0) + 1
    parts = manifest.get("partitions") or {}
    lines = [
        f"# MTP quantisation report — {manifest['spec']['arch'].upper()}, {len(tokens)} routed experts",
        "",
        f"Replay `{manifest['replay']}` over {s['rows']:,} store rows "
        f"({', '.join(st['path'] for st in manifest['stores'])}): {s.get('rows_calibration', s['rows']):,} calibration "
        f"rows in {s.get('partitions', 1)} partitions, {s.get('rows_heldout', 0):,} held-out rows "
        f"({parts.get('heldout', {}).get('prompts', 0)} of "
        f"{parts.get('heldout', {}).get('prompts', 0) + parts.get('calibration', {}).get('prompts', 0)} prompts, "
        f"seed {parts.get('seed', 0)}); {len(records)} tensors W4A16 g128 symmetric, "
        f"GPTQ damp {manifest['gptq']['damp']}, act-order {manifest['gptq']['act_order']}; "
        f"{s['workers']} worker(s){' on Ray' if s['ray'] else ''} ({s.get('parallel', 'data')}); "
        f"{s['seconds_total']:.1f} s. {plots}",
        "",
        "| | |",
        "|---|---|",
    ]
    if heldout:
        lines += [f"| mean GPTQ rel. output error, **held-out** | {_fmt(s.get('err_gptq_heldout_mean'))} |",
                  f"| mean RTN rel. output error, held-out | {_fmt(s.get('err_rtn_heldout_mean'))} |",
                  f"| tensors whose held-out error is not below RTN's | {s.get('heldout_not_below_rtn')} |"]
    lines += [
        f"| mean GPTQ rel. output error, in-sample | {_fmt(s['err_gptq_mean'])} |",
        f"| mean RTN rel. output error, in-sample | {_fmt(s['err_rtn_mean'])} |",
        f"| tokens per expert min / mean / max | {min(tokens):,} / {sum(tokens) / len(tokens):,.0f} / {max(tokens):,} |",
        f"| experts under {min_tokens} tokens | {len(under)} |",
        f"| paths | {', '.join(f'{k} {v}' for k, v in sorted(paths.items()))} |",
        "",
        f"![tokens per expert]({PLOT_TOKENS})",
        "",
    ]
    if under:
        lines += [f"## Under-covered experts (< {min_tokens} tokens)", "",
                  "Quantised anyway: GPTQ from few tokens, or RTN (flagged `rtn_zero_tokens`) for an expert "
                  "that got none. Capture more prompts that route there to improve them.", "",
                  ", ".join(f"{e} ({t})" for e, t in under), ""]
    odd = [r for r in records if r["path"] != "gptq"]
    if odd:
        lines += ["## Tensors not on the plain GPTQ path", "", "| tensor | tokens | path | damp |", "|---|---|---|---|"]
        lines += [f"| `{r['name']}` | {r['tokens']} | {r['path']} | {r['damp']} |" for r in odd[:50]]
        if len(odd) > 50:
            lines.append(f"| … {len(odd) - 50} more (manifest.json) | | | |")
        lines.append("")
    if heldout:
        flagged = [r for r in records if r.get("heldout_not_below_rtn")]
        lines += ["## GPTQ vs RTN on held-out prompts", "",
                  "The relative output error tr(ΔW H ΔWᵀ)/tr(W H Wᵀ) with H from the held-out prompts' sequences, "
                  "which GPTQ never saw — the figure to judge quality by; the in-sample one below uses the "
                  "Hessian GPTQ fitted and flatters it when an expert saw few tokens.", "",
                  f"![held-out GPTQ vs RTN]({PLOT_HELDOUT}) ![in-sample vs held-out]({PLOT_INSAMPLE_HELDOUT})", ""]
        if flagged:
            lines += [f"{len(flagged)} tensor(s) whose held-out error is not below RTN's (GPTQ did no good there):", "",
                      "| tensor | tokens (cal / held-out) | path | GPTQ held-out | RTN held-out | GPTQ in-sample |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| `{r['name']}` | {r['tokens']} / {r['tokens_heldout']} | {r['path']} | "
                      f"{_fmt(r['err_gptq_heldout'])} | {_fmt(r['err_rtn_heldout'])} | {_fmt(r['err_gptq'])} |"
                      for r in flagged[:50]]
            if len(flagged) > 50:
                lines.append(f"| … {len(flagged) - 50} more (manifest `heldout_not_below_rtn`) | | | | | |")
        else:
            lines.append("Every tensor's held-out error is below RTN's.")
        no_tokens = sum(r.get("tokens_heldout") == 0 for r in records)
        if no_tokens:
            lines += ["", f"{no_tokens} tensor(s) of experts that no held-out token reached have no held-out figure."]
        lines.append("")
    worst = sorted((r for r in records if r["err_gptq"] is not None), key=lambda r: -r["err_gptq"])[:10]
    lines += ["## GPTQ vs RTN, in-sample", "", f"![GPTQ vs RTN in-sample]({PLOT_ERRORS})", "",
              "Worst tensors (in-sample):", "", "| tensor | tokens | GPTQ | RTN |", "|---|---|---|---|"]
    lines += [f"| `{r['name']}` | {r['tokens']} | {_fmt(r['err_gptq'])} | {_fmt(r['err_rtn'])} |" for r in worst]
    lines.append("")
    if distance:
        d_in = [v[0] for v in distance.values()]
        d_mid = [v[1] for v in distance.values()]
        lines += ["## Identity vs full replay", "",
                  "Relative Frobenius distance of each expert's mean Hessian, quantised from `full`:", "",
                  "| | mean | max |", "|---|---|---|",
                  f"| w1/w3 input | {_fmt(_mean(d_in))} | {_fmt(max(d_in))} |",
                  f"| w2 input | {_fmt(_mean(d_mid))} | {_fmt(max(d_mid))} |", "",
                  f"![Hessian distance]({PLOT_DISTANCE})", ""]
    workers = manifest.get("workers") or []
    if workers:
        lines += ["## Workers", "", "| rank | experts | partitions replayed | rows | store MB read | Hessian MB reduced |",
                  "|---|---|---|---|---|---|"]
        for w in workers:
            ex = "–".join(str(e) for e in w["experts"]) or "none"
            pp = "; ".join(f"{k}: {len(v)}" for k, v in w["partitions"].items())
            lines.append(f"| {w['rank']} | {ex} | {pp} | {w['rows']:,} | {w['bytes_read'] / 1e6:,.1f} | "
                         f"{w['bytes_reduced'] / 1e6:,.1f} |")
        lines.append("")
    lines += ["## Timings", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in manifest["timings"].items()]
    lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path

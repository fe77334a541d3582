"""Plain-text tables for the CLI's final summaries."""
from __future__ import annotations


def table(rows: list[tuple[str, object]], title: str = "") -> str:
    w = max((len(k) for k, _ in rows), default=0)
    lines = [title, "-" * max(len(title), 20)] if title else []
    for k, v in rows:
        if isinstance(v, bool) or v is None:
            v = str(v)
        elif isinstance(v, float):
            v = f"{v:,.2f}"
        elif isinstance(v, int):
            v = f"{v:,}"
        lines.append(f"{k.ljust(w)}  {v}")
    return "\n".join(lines)


def capture_table(res: dict) -> str:
    st = res.get("stage_seconds", {})
    rows = [("store", res.get("store", "")), ("ledger", res.get("ledger", "")),
            ("prompts total", res["prompts_total"]), ("prompts in store", res["prompts_done"]),
            ("skipped (captured before)", res["prompts_skipped"]), ("failed", res["prompts_failed"]),
            ("retried", res["prompts_retried"]), ("re-queued", res["prompts_requeued"]),
            ("duplicates in store", res["duplicates"]), ("replica restarts", res["replica_restarts"]),
            ("rows in store", res["rows"]), ("row bytes in store", res["bytes"]),
            ("enforce eager", res.get("enforce_eager")), ("elapsed s", res["elapsed_s"])]
    rows += [(f"stage {k} s", float(v)) for k, v in st.items()]
    cov = res.get("coverage") or {}
    if cov:
        rows += [("min tokens per expert", cov["min_tokens_per_expert"]), ("coverage target", cov["target"]),
                 ("coverage reached", str(cov.get("reached")))]
    return table(rows, "capture job")

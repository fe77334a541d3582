"""One control-plane job, in its own process: ``python -m requant.orchestrator.runner DIR``.

Reads DIR/spec.json, writes progress to DIR/status.json (capture) and the outcome to
DIR/result.json ({"ok": bool, "error": str | None, ...}) — what the API reports."""
from __future__ import annotations

import json
import signal
import sys
import traceback
from pathlib import Path

from .records import JobResult, write_json
from .spec import parse_spec


def main(d: str) -> int:
    d = Path(d)
    spec = parse_spec(json.loads((d / "spec.json").read_text()))
    try:
        if spec.kind == "capture":
            from .job import CaptureJob

            job = CaptureJob(spec, progress=False, status_file=str(d / "status.json"))
            signal.signal(signal.SIGTERM, lambda *_: job.cancel())
            res = job.run()
            ok = res["prompts_failed"] == 0 and res["duplicates"] == 0
            JobResult(ok=ok, error=None if ok else "prompts failed or duplicated", **res).write(d / "result.json")
        elif spec.kind == "evaluate":
            from .evaluate import run_evaluate

            if Path(spec.out).exists():
                JobResult(ok=True, out=spec.out, note="already written").write(d / "result.json")
                return 0
            write_json(d / "status.json", {"state": "evaluating"})
            r = run_evaluate(spec.job())
            write_json(d / "status.json", {"state": "done"})
            summary = {m: v["acceptance"] for m, v in (r.get("offline") or {}).get("modes", {}).items()}
            if r.get("online"):
                summary["online"] = r["online"]["acceptance"]
            JobResult(ok=True, out=spec.out, acceptance=summary, agreement=r.get("agreement")).write(d / "result.json")
        else:
            from requant.quantizer.stage.run import run_quantize

            if Path(spec.out).exists() and (Path(spec.out) / "requant-manifest.json").exists():
                JobResult(ok=True, out=spec.out, note="already published").write(d / "result.json")
                return 0
            write_json(d / "status.json", {"state": "quantizing"})
            r = run_quantize(spec.job(), progress=False)
            write_json(d / "status.json", {"state": "done", "stage_seconds": {
                k: v for k, v in (r.summary.get("timings") or {}).items() if isinstance(v, (int, float))}})
            JobResult(ok=True, out=str(r.out), shard=str(r.shard), manifest=str(r.manifest),
                      report=str(r.report)).write(d / "result.json")
    except Exception as e:  # noqa: BLE001 — reported through the API
        traceback.print_exc()
        JobResult(ok=False, error=f"{type(e).__name__}: {e}").write(d / "result.json")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

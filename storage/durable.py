"""Durability on local file systems: fsync of files, directories and trees, so a rename that
publishes them (a committed chunk, a finished checkpoint) survives power loss."""
from __future__ import annotations

import os
from pathlib import Path


def fsync(path: str | Path) -> None:
    """fsync one file or directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_paths(root: str | Path, names: list[str], pool=None) -> None:
    """fsync the files ``names`` under ``root`` that exist, their directories and ``root``
    itself. With ``pool`` (an executor) the fsyncs run concurrently: the file system's
    journal takes them in one flush rather than one after another."""
    root = Path(root)
    files = [root / rel for rel in names if (root / rel).is_file()]
    dirs = {root} | {p.parent for p in files}
    if pool is None:
        for p in files + sorted(dirs):
            fsync(p)
        return
    for f in [pool.submit(fsync, p) for p in files]:
        f.result()
    for f in [pool.submit(fsync, d) for d in dirs]:
        f.result()


def fsync_tree(d: str | Path) -> None:
    """fsync the files directly in ``d`` and ``d`` itself (a directory about to be renamed
    into place)."""
    d = Path(d)
    fsync_paths(d, [p.name for p in d.iterdir() if p.is_file()])

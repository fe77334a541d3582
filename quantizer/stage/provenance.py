"""What a quantize run was made from, for its manifest: the inputs' hashes (the master's MTP
tensors, the base's config, index and shard headers), each capture store's identity, and the
library versions."""
from __future__ import annotations

import hashlib
import json
import platform
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from requant.quantizer.mtp.arch import MTPSpec, config_file
from requant.quantizer.mtp.weights import read_header


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 16 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_tensors(where: dict[str, Path], names: list[str], threads: int = 8) -> str:
    """sha256 over the per-tensor sha256s of ``names`` (each over name, dtype, shape, raw bytes) —
    the master's MTP layer, not the whole (hundreds of GB) checkpoint; tensors hashed in
    parallel threads (hashlib and file reads release the GIL)."""
    heads = {p: read_header(p) for p in set(where[n] for n in names)}
    starts = {}
    for p in heads:
        with open(p, "rb") as f:
            starts[p] = 8 + int.from_bytes(f.read(8), "little")

    def one(n: str) -> str:
        p = where[n]
        a, b = heads[p][n]["data_offsets"]
        h = hashlib.sha256(json.dumps([n, heads[p][n]["dtype"], heads[p][n]["shape"]]).encode())
        with open(p, "rb") as f:
            f.seek(starts[p] + a)
            left = b - a
            while left:
                chunk = f.read(min(left, 1 << 26))
                h.update(chunk)
                left -= len(chunk)
        return h.hexdigest()

    with ThreadPoolExecutor(threads) as pool:
        digests = list(pool.map(one, sorted(names)))
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def hash_inputs(master: Path, where: dict[str, Path], spec: MTPSpec, base: Path, base_index: dict) -> dict:
    """The manifest's ``inputs``: the master's config and MTP tensors (``where``: the master's
    tensor → file map), the base's config, index and each shard's size and header."""
    cfg = config_file(master)
    shards = {}
    for f in sorted(set(base_index["weight_map"].values())):
        p = base / f
        with open(p, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            shards[f] = {"bytes": p.stat().st_size, "header_sha256": hashlib.sha256(fh.read(n)).hexdigest()}
    return {"master": {"path": str(master), "config_sha256": file_sha256(cfg),
                       "mtp_tensors_sha256": hash_tensors(where, [n for n in where if n.startswith(spec.prefix)]),
                       "mtp_tensors_hash": "sha256 of the concatenated hex sha256s of each tensor "
                                           "(name, dtype, shape json + raw bytes), tensors sorted by name"},
            "base": {"path": str(base), "config_sha256": file_sha256(base / "config.json"),
                     "index_sha256": file_sha256(base / "model.safetensors.index.json"), "shards": shards}}


def store_facts(path: str) -> dict:
    """Identity of a capture store: its metadata, committed rows per writer group, and an id
    (sha256 of both) that changes whenever rows are added."""
    from requant.storage import CaptureStore, CorruptStoreError

    st = CaptureStore.open(path)
    problems = st.verify(read_rows=False)  # damage found in seconds, not after the master is loaded
    if problems:
        raise CorruptStoreError(problems[0] + (f" (and {len(problems) - 1} more problems: requant store verify {path})"
                                               if len(problems) > 1 else ""))
    groups = {g: dict(zip(("rows", "sequences"), st.committed(g))) for g in st.writer_names()}
    meta = st.meta.to_json()
    ident = hashlib.sha256(json.dumps([meta, groups], sort_keys=True).encode()).hexdigest()[:16]
    return {"path": str(path), "id": ident, "rows": sum(g["rows"] for g in groups.values()),
            "sequences": sum(g["sequences"] for g in groups.values()), "groups": groups,
            "model": meta.get("model"), "capture_point": meta.get("capture_point"),
            "created_at": meta.get("created_at"), "requant_version": meta.get("requant_version")}


def versions() -> dict:
    """Python, torch and the installed versions of requant and the libraries that shape the output."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("requant", "safetensors", "zarr", "ray"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out

"""Open/create capture stores and their writer groups; info and verify."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from .schema import (COMMIT_ATTR, INDEX_ARRAYS, ROOT_ATTR, ROW_ARRAYS, WRITERS, CorruptStoreError,
                     Layout, NotAStoreError, StoreError, StoreMeta)


def _is_url(path: str) -> bool:
    return "://" in path


def _local(path: str) -> Path | None:
    """The directory of a local store (plain path or file:// URL); None for remote URLs."""
    if path.startswith("file://"):
        return Path(path.removeprefix("file://"))
    return None if _is_url(path) else Path(path)


def _zarr_group(path: str, mode: str):
    # fsspec's local filesystem only creates parent directories when asked to.
    opts = {"auto_mkdir": True} if path.startswith("file://") else None
    return zarr.open_group(path, mode=mode, storage_options=opts)


def _open_root(path: str, mode: str):
    try:
        return _zarr_group(path, mode)
    except FileNotFoundError as e:
        raise NotAStoreError(f"{path}: no capture store here") from e
    except (zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError, ValueError) as e:
        raise NotAStoreError(f"{path}: not a capture store ({e})") from e


class CaptureStore:
    """A capture store: one Zarr v3 hierarchy, one group per writer (replica × rank).

    ``path`` is a local directory or an fsspec URL Zarr supports (``s3://bucket/run``
    with s3fs installed; credentials from the environment).
    """

    def __init__(self, path: str | Path, root, meta: StoreMeta, layout: Layout, writable: bool):
        self.path = str(path)
        self.root = root
        self.meta = meta
        self.layout = layout
        self.writable = writable

    @property
    def is_local(self) -> bool:
        return _local(self.path) is not None

    # -- creation / opening -------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, meta: StoreMeta, layout: Layout = Layout(),
               exist_ok: bool = False) -> "CaptureStore":
        path = str(path)
        if meta.hidden_size <= 0 or meta.hc_mult <= 0:
            raise ValueError(f"{path}: hidden_size and hc_mult must be positive")
        local = _local(path)
        if local is not None and local.exists() and any(local.iterdir()):
            if not exist_ok:
                raise FileExistsError(f"{path}: exists and is not empty")
            store = cls.open(path, mode="r+")
            if store.meta.row_width != meta.row_width:
                raise ValueError(f"{path}: store has rows of {store.meta.hc_mult}×{store.meta.hidden_size}, "
                                 f"not {meta.hc_mult}×{meta.hidden_size}")
            return store
        layout.codecs()  # validate
        root = _zarr_group(path, "w")
        root.attrs[ROOT_ATTR] = {**meta.to_json(), "layout": layout.__dict__}
        root.require_group(WRITERS)
        return cls(path, root, meta, layout, writable=True)

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "CaptureStore":
        path = str(path)
        local = _local(path)
        if local is not None and not local.exists():
            raise NotAStoreError(f"{path}: no such directory")
        root = _open_root(path, mode)
        attrs = root.attrs.asdict()
        if ROOT_ATTR not in attrs:
            raise NotAStoreError(f"{path}: a Zarr group but not a requant capture store (no '{ROOT_ATTR}' attribute)")
        data = dict(attrs[ROOT_ATTR])
        layout = Layout(**data.pop("layout", {}))
        return cls(path, root, StoreMeta.from_json(data, path), layout, writable=mode != "r")

    # -- groups -------------------------------------------------------------------------
    def writer_names(self) -> list[str]:
        if WRITERS not in self.root:
            raise CorruptStoreError(f"{self.path}: missing '{WRITERS}' group")
        return sorted(name for name, _ in self.root[WRITERS].groups())

    def group(self, name: str):
        try:
            return self.root[f"{WRITERS}/{name}"]
        except KeyError as e:
            raise StoreError(f"{self.path}: no writer group {name!r}") from e

    def group_path(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{WRITERS}/{name}"

    def group_dir(self, name: str) -> Path | None:
        """The directory of a writer group of a local store; None for remote stores."""
        local = _local(self.path)
        return None if local is None else local / WRITERS / name

    def committed(self, name: str) -> tuple[int, int]:
        """(rows, sequences) committed in a writer group."""
        c = self.group(name).attrs.get(COMMIT_ATTR)
        if c is None:
            raise CorruptStoreError(f"{self.group_path(name)}: no commit record")
        return int(c["rows"]), int(c["sequences"])

    def writer(self, name: str, **kwargs):
        from .writer import GroupWriter

        if not self.writable:
            raise StoreError(f"{self.path}: opened read-only")
        return GroupWriter(self, name, **kwargs)

    def _create_group(self, name: str):
        """Create (or validate and return) the arrays of a writer group."""
        if "/" in name or not name:
            raise ValueError(f"invalid writer name {name!r}")
        lay, width = self.layout, self.meta.row_width
        wroot = self.root[WRITERS]
        if name in wroot:
            g = wroot[name]
            for a in ROW_ARRAYS:
                if a not in g:
                    raise CorruptStoreError(f"{self.group_path(name)}: missing array {a!r}")
            if g["hidden"].shape[1] != width:
                raise CorruptStoreError(f"{self.group_path(name)}: hidden width {g['hidden'].shape[1]} != {width}")
            return g
        g = wroot.create_group(name)
        codecs = lay.codecs()
        g.create_array("hidden", shape=(0, width), dtype="uint16", chunks=(lay.rows_per_chunk, width),
                       shards=(lay.rows_per_shard, width), compressors=codecs, fill_value=0,
                       attributes={"dtype": self.meta.dtype})
        for a, dt in (("next_token", "int32"), ("position", "int32"), ("seq", "int64")):
            g.create_array(a, shape=(0,), dtype=dt, chunks=(lay.rows_per_chunk,),
                           shards=(lay.rows_per_shard,), compressors=codecs, fill_value=0)
        idx = g.create_group("index")
        for a, dt in (("seq", "int64"), ("first_row", "int64"), ("length", "int64"), ("replica", "int32")):
            idx.create_array(a, shape=(0,), dtype=dt, chunks=(lay.index_rows_per_chunk,),
                             compressors=codecs, fill_value=0)
        idx.create_array("prompt_id", shape=(0,), dtype=str, chunks=(lay.index_rows_per_chunk,))
        g.attrs[COMMIT_ATTR] = {"rows": 0, "sequences": 0}
        return g

    # -- reading helpers ----------------------------------------------------------------
    def index(self, name: str) -> dict[str, np.ndarray]:
        """The committed per-sequence index of a writer group."""
        rows, n = self.committed(name)
        g = self.group(name)
        if "index" not in g:
            raise CorruptStoreError(f"{self.group_path(name)}: missing sequence index")
        out = {}
        for a in INDEX_ARRAYS:
            if a not in g["index"]:
                raise CorruptStoreError(f"{self.group_path(name)}: missing index array {a!r}")
            arr = g["index"][a]
            if arr.shape[0] < n:
                raise CorruptStoreError(f"{self.group_path(name)}/index/{a}: {arr.shape[0]} entries < {n} committed")
            out[a] = arr[:n]
        return out

    def info(self) -> "StoreInfo":
        writers = {}
        for name in self.writer_names():
            writers[name] = self.committed(name)
        rows = sum(r for r, _ in writers.values())
        raw = rows * (self.meta.row_width * 2 + 4 + 4 + 8)
        return StoreInfo(path=self.path, meta=self.meta, writers=writers, rows=rows,
                         sequences=sum(s for _, s in writers.values()), raw_bytes=raw,
                         stored_bytes=self.stored_bytes())

    def stored_bytes(self) -> int | None:
        if not self.is_local:
            return None
        root = _local(self.path)
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())

    def verify(self) -> list[str]:
        """Read every committed chunk (crc32c-checked), check that every chunk file a
        committed row needs exists (local stores) and that the index agrees with the rows;
        returns the problems found, each naming its path."""
        try:
            names = self.writer_names()
        except StoreError as e:
            return [str(e)]
        return [p for name in names for p in self._verify_group(name)]

    def _verify_group(self, name: str) -> list[str]:
        gp = self.group_path(name)
        try:
            rows, nseq = self.committed(name)
            g = self.group(name)
            idx = self.index(name)
        except StoreError as e:
            return [str(e)]
        problems = [f"{gp}: missing array {a!r}" for a in ROW_ARRAYS if a not in g]
        problems += [f"{gp}/{a}: {g[a].shape[0]} rows < {rows} committed"
                     for a in ROW_ARRAYS if a in g and g[a].shape[0] < rows]
        if problems:
            return problems
        problems += self._missing_files(name, rows, nseq)
        from .reader import _ShardFile  # direct reads: they also catch a missing shard

        lay, step = self.layout, self.layout.rows_per_chunk
        direct = _ShardFile.usable(self)
        seq_col = np.empty(rows, dtype=np.int64)
        shard = None
        for a in ROW_ARRAYS:
            for r0 in range(0, rows, step):
                r1 = min(r0 + step, rows)
                try:
                    if direct and a == "hidden":
                        k = r0 // lay.rows_per_shard
                        if shard is None or shard.k != k:
                            shard = _ShardFile(self, name, k)
                        shard.read_rows(r0, r1, np.empty((r1 - r0, self.meta.row_width), np.uint16))
                    else:
                        data = g[a][r0:r1]
                        if a == "seq":
                            seq_col[r0:r1] = data
                except Exception as e:  # noqa: BLE001 — codec errors differ by codec
                    problems.append(f"{gp}/{a}: rows {r0}–{r1} unreadable (chunk {r0 // step}): "
                                    f"{type(e).__name__}: {e}")
                    shard = None
        first, length = idx["first_row"], idx["length"]
        if nseq and (first[0] != 0 or np.any(first[1:] != first[:-1] + length[:-1])):
            problems.append(f"{gp}/index: sequences are not contiguous from row 0")
        if int(length.sum()) != rows:
            problems.append(f"{gp}/index: lengths sum to {int(length.sum())}, committed rows {rows}")
        if np.any(length <= 0):
            problems.append(f"{gp}/index: empty sequence entries")
        elif not problems:
            expect = np.repeat(idx["seq"], length)
            if len(expect) == rows and not np.array_equal(expect, seq_col):
                problems.append(f"{gp}/seq: row sequence ids disagree with the index")
        return problems

    def _missing_files(self, name: str, rows: int, nseq: int) -> list[str]:
        """Chunk files committed rows need (a missing one would read as zeros: stores of
        this format write every chunk, empty or not). Local stores only."""
        d = self.group_dir(name)
        if d is None or self.meta.format < 2:
            return []
        lay, gp = self.layout, self.group_path(name)
        shards = -(-rows // lay.rows_per_shard)
        want = [(f"hidden/c/{k}/0", k * lay.rows_per_shard) for k in range(shards)]
        want += [(f"{a}/c/{k}", k * lay.rows_per_shard) for a in ROW_ARRAYS[1:] for k in range(shards)]
        missing = [f"{gp}/{rel}: missing chunk file (rows from {r0})" for rel, r0 in want if not (d / rel).is_file()]
        ichunks = -(-nseq // lay.index_rows_per_chunk)
        missing += [f"{gp}/index/{a}/c/{c}: missing chunk file" for a in INDEX_ARRAYS
                    for c in range(ichunks) if not (d / "index" / a / "c" / str(c)).is_file()]
        return missing


@dataclass
class StoreInfo:
    path: str
    meta: StoreMeta
    writers: dict[str, tuple[int, int]]
    rows: int
    sequences: int
    raw_bytes: int
    stored_bytes: int | None

    @property
    def ratio(self) -> float | None:
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else None


def fsync_paths(root: str | Path, names: list[str]) -> None:
    """fsync the files ``names`` under ``root`` that exist, their directories and ``root``
    itself, so committed chunks and their renames survive power loss (local stores)."""
    root = Path(root)
    dirs = {root}
    for rel in names:
        p = root / rel
        if p.is_file():
            _fsync(p)
            dirs.add(p.parent)
    for d in dirs:
        _fsync(d)


def _fsync(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

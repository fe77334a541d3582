"""Open/create capture stores and their writer groups; info and verify."""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import functools
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import zarr

from . import shard
from .checksum import SequenceCheck, bad_entries, commit_problem, commit_record, meta_crc
from .schema import (CHECKSUMMED, COMMIT_ATTR, CRC_ARRAY, ROOT_ATTR, ROOT_CRC_ATTR, ROW_ARRAYS, WRITERS,
                     CorruptStoreError, IncompatibleStoreError, Layout, NotAStoreError, StoreError, StoreMeta,
                     index_arrays)


class Commit(NamedTuple):
    """What a writer group has committed: rows and the sequences they make up."""
    rows: int
    sequences: int


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


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _open_root(path: str, mode: str):
    local = _local(path)
    if local is not None and not (local / "zarr.json").is_file() and (local / WRITERS).is_dir():
        raise CorruptStoreError(f"{path}/zarr.json: missing — the store's metadata file is gone "
                                f"(its {WRITERS}/ directory is still there)")
    try:
        return _zarr_group(path, mode)
    except Exception as e:  # noqa: BLE001 — zarr reports a damaged document in many ways
        if local is not None and (local / "zarr.json").is_file():
            raise CorruptStoreError(f"{path}/zarr.json: unreadable store metadata ({_why(e)})") from e
        if isinstance(e, FileNotFoundError):
            raise NotAStoreError(f"{path}: no capture store here") from e
        raise NotAStoreError(f"{path}: not a capture store ({e})") from e


def _check_layout(data: dict, path: str) -> Layout:
    try:
        layout = Layout(**data)
    except TypeError as e:
        raise CorruptStoreError(f"{path}/zarr.json: store layout unreadable ({e})") from None
    for name in ("rows_per_chunk", "chunks_per_shard", "index_rows_per_chunk"):
        v = getattr(layout, name)
        if type(v) is not int or v <= 0:
            raise CorruptStoreError(f"{path}/zarr.json: store layout {name} = {v!r}, not a positive integer")
    return layout


def _make_arrays(g, layout: Layout, meta: StoreMeta) -> None:
    """The arrays of a new writer group (also the template ``_expected_metadata`` checks against)."""
    codecs, width = layout.codecs(), meta.row_width
    g.create_array("hidden", shape=(0, width), dtype="uint16", chunks=(layout.rows_per_chunk, width),
                   shards=(layout.rows_per_shard, width), compressors=codecs, fill_value=0,
                   attributes={"dtype": meta.dtype})
    for a, dt in (("next_token", "int32"), ("position", "int32"), ("seq", "int64")):
        g.create_array(a, shape=(0,), dtype=dt, chunks=(layout.rows_per_chunk,),
                       shards=(layout.rows_per_shard,), compressors=codecs, fill_value=0)
    idx = g.create_group("index")
    for a, dt in (("seq", "int64"), ("first_row", "int64"), ("length", "int64"), ("replica", "int32")):
        idx.create_array(a, shape=(0,), dtype=dt, chunks=(layout.index_rows_per_chunk,),
                         compressors=codecs, fill_value=0)
    checksummed = meta.format >= CHECKSUMMED
    idx.create_array("prompt_id", shape=(0,), dtype=str, chunks=(layout.index_rows_per_chunk,),
                     **({"compressors": codecs} if checksummed else {}))
    if checksummed:
        idx.create_array(CRC_ARRAY, shape=(0, 4), dtype="uint32", chunks=(layout.index_rows_per_chunk, 4),
                         compressors=codecs, fill_value=0)


class GroupLock:
    """flock on a writer group's directory: one writer per group, across threads and
    processes; the kernel drops it when the process dies."""

    def __init__(self, directory: Path, where: str):
        self.fd = os.open(directory, os.O_RDONLY)
        if not _try_flock(self.fd):
            os.close(self.fd)
            raise StoreError(f"{where}: another writer has this group open (one writer per group; "
                             f"give each process its own writer name)")

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1

    @staticmethod
    def held(directory: Path) -> bool:
        """Whether some writer holds the group in ``directory`` now."""
        fd = os.open(directory, os.O_RDONLY)
        try:
            return not _try_flock(fd)
        finally:
            os.close(fd)  # closing drops our probe's lock


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


# Zarr v3 metadata documents: (keys allowed, keys required)
_DOC_KEYS = {"group": ({"zarr_format", "node_type", "attributes", "consolidated_metadata"},
                       {"zarr_format", "node_type"}),
             "array": ({"zarr_format", "node_type", "shape", "data_type", "chunk_grid", "chunk_key_encoding",
                        "fill_value", "codecs", "attributes", "storage_transformers", "dimension_names"},
                       {"zarr_format", "node_type", "shape", "data_type", "chunk_grid", "chunk_key_encoding",
                        "fill_value", "codecs"})}


@functools.lru_cache(maxsize=16)
def _expected_metadata(layout: Layout, width: int, dtype: str, fmt: int) -> dict:
    """Array path → its metadata (zarr's parsed form, shape left out) as this store's layout
    defines it: what a group's metadata documents must say, built in memory."""
    g = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    _make_arrays(g, layout, StoreMeta(hidden_size=width, dtype=dtype, format=fmt))
    rels = list(ROW_ARRAYS) + [f"index/{a}" for a in index_arrays(fmt)]
    out = {}
    for rel in rels:
        d = g[rel].metadata.to_dict()
        d.pop("shape")
        out[rel] = d
    return out


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

    @property
    def direct_io(self) -> bool:
        """Whether hidden shards are written and read by shard.py (local stores of its codecs)
        rather than through zarr-python."""
        return self.is_local and shard.direct(self.layout)

    # -- creation / opening -------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, meta: StoreMeta, layout: Layout = Layout(),
               exist_ok: bool = False) -> "CaptureStore":
        """A new store at ``path``; with ``exist_ok`` the store already there (of the same row
        width). Several processes may create the same local store at once (a job's replicas
        at start-up): it is built beside ``path`` and renamed into place, so exactly one
        creation wins and every process opens the same store (the same uid)."""
        path = str(path)
        if meta.hidden_size <= 0 or meta.hc_mult <= 0:
            raise ValueError(f"{path}: hidden_size and hc_mult must be positive")
        local = _local(path)
        if local is not None and local.exists() and any(local.iterdir()):
            return cls._existing(path, meta, exist_ok)
        layout.codecs()  # validate
        if meta.format < CHECKSUMMED:  # an older format (tests of compatibility): as those had no uid
            meta = dataclasses.replace(meta, uid="")
        doc = {**{k: v for k, v in meta.to_json().items() if k != "uid" or v}, "layout": layout.__dict__}
        attrs = {ROOT_ATTR: doc}
        if meta.format >= CHECKSUMMED:
            attrs[ROOT_CRC_ATTR] = meta_crc(doc)
        def init(where: str):
            root = _zarr_group(where, "w-")  # ("w" would first delete the directory: not a mount point)
            root.attrs.update(attrs)
            root.require_group(WRITERS)
            return root

        if local is None:  # object stores: no rename; "w-" refuses to overwrite a store already there
            try:
                cls.open(path)
                return cls._existing(path, meta, exist_ok)
            except NotAStoreError:
                return cls(path, init(path), meta, layout, writable=True)
        if not local.parent.is_dir():
            try:
                local.parent.mkdir(parents=True)
            except OSError as e:  # (a parent that is a file: "exists")
                code = errno.ENOTDIR if isinstance(e, FileExistsError) else e.errno
                raise OSError(code, f"cannot make the store's directory ({os.strerror(code)}: {e.filename})",
                              path) from None
        tmp = local.parent / f".{local.name}.creating-{os.getpid()}-{id(doc):x}"
        try:
            init(str(tmp))
            os.rename(tmp, local)  # atomic; refused when another process's store is already there
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if local.is_dir() and any(local.iterdir()):
                return cls._existing(path, meta, exist_ok)
            if not local.is_dir():
                raise
            init(path)  # an empty directory that cannot be replaced (a mount point): in place
        return cls.open(path, mode="r+")

    @classmethod
    def _existing(cls, path: str, meta: StoreMeta, exist_ok: bool) -> "CaptureStore":
        if not exist_ok:
            raise FileExistsError(f"{path}: exists and is not empty")
        store = cls.open(path, mode="r+")
        if store.meta.row_width != meta.row_width:
            raise ValueError(f"{path}: store has rows of {store.meta.hc_mult}×{store.meta.hidden_size}, "
                             f"not {meta.hc_mult}×{meta.hidden_size}")
        return store

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "CaptureStore":
        path = str(path)
        local = _local(path)
        if local is not None and not local.exists():
            raise NotAStoreError(f"{path}: no such directory")
        root = _open_root(path, mode)
        attrs = root.attrs.asdict()
        if ROOT_ATTR not in attrs:
            if ROOT_CRC_ATTR in attrs:
                raise CorruptStoreError(f"{path}/zarr.json: the '{ROOT_ATTR}' attribute is gone (damaged file)")
            raise NotAStoreError(f"{path}: a Zarr group but not a requant capture store (no '{ROOT_ATTR}' attribute)")
        doc = attrs[ROOT_ATTR]
        if not isinstance(doc, dict):
            raise CorruptStoreError(f"{path}/zarr.json: store metadata is {type(doc).__name__}, not an object")
        crc_ok = attrs.get(ROOT_CRC_ATTR) == meta_crc(doc)
        try:
            meta = StoreMeta.from_json({k: v for k, v in doc.items() if k != "layout"}, path)
        except IncompatibleStoreError as e:
            if not crc_ok:
                raise IncompatibleStoreError(f"{e}; its metadata checksum does not match either — the file may be "
                                             "damaged") from None
            raise
        if not crc_ok and (meta.format >= CHECKSUMMED or ROOT_CRC_ATTR in attrs):
            raise CorruptStoreError(f"{path}/zarr.json: store metadata checksum "
                                    f"{'mismatch' if ROOT_CRC_ATTR in attrs else 'missing'} (damaged file)")
        layout = _check_layout(doc.get("layout", {}), path)
        return cls(path, root, meta, layout, writable=mode != "r")

    @property
    def checksummed(self) -> bool:
        """Format 3 and later: uid, metadata and per-sequence checksums."""
        return self.meta.format >= CHECKSUMMED

    # -- groups -------------------------------------------------------------------------
    def writer_names(self) -> list[str]:
        local = _local(self.path)
        where = f"{self.path.rstrip('/')}/{WRITERS}"
        if local is not None and not (local / WRITERS / "zarr.json").is_file():
            raise CorruptStoreError(f"{where}/zarr.json: missing '{WRITERS}' group metadata")
        try:
            if WRITERS not in self.root:
                raise CorruptStoreError(f"{self.path}: missing '{WRITERS}' group")
            writers = self.root[WRITERS]
            if not isinstance(writers, zarr.Group) or writers.attrs.asdict():
                raise CorruptStoreError(f"{where}/zarr.json: not the writers group's metadata")
            if local is not None:  # the directories: a group whose metadata is damaged or gone is named
                return sorted(p.name for p in (local / WRITERS).iterdir() if p.is_dir() and not p.name.startswith("."))
            return sorted(name for name, _ in writers.groups())
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 — zarr reports damaged documents in many ways
            raise CorruptStoreError(f"{where}: group metadata unreadable ({_why(e)})") from e

    def group(self, name: str):
        gp = self.group_path(name)
        d = self.group_dir(name)
        if d is not None and d.is_dir() and not (d / "zarr.json").is_file():
            raise CorruptStoreError(f"{gp}/zarr.json: missing (the writer group's metadata and commit record)")
        try:
            return self.root[f"{WRITERS}/{name}"]
        except KeyError as e:
            raise StoreError(f"{self.path}: no writer group {name!r}") from e
        except Exception as e:  # noqa: BLE001
            raise CorruptStoreError(f"{gp}/zarr.json: unreadable group metadata ({_why(e)})") from e

    def array(self, name: str, rel: str, group=None):
        """Array ``rel`` (``hidden``, ``index/seq``, …) of writer group ``name``, its metadata
        checked against what the store's layout defines (a damaged document is named)."""
        gp = self.group_path(name)
        g = self.group(name) if group is None else group
        label = f"index array {rel.split('/', 1)[1]!r}" if rel.startswith("index/") else f"array {rel!r}"
        try:
            arr = g[rel]
        except KeyError:
            raise CorruptStoreError(f"{gp}: missing {label} ({rel}/zarr.json)") from None
        except Exception as e:  # noqa: BLE001
            raise CorruptStoreError(f"{gp}/{rel}/zarr.json: unreadable array metadata ({_why(e)})") from e
        if not isinstance(arr, zarr.Array):
            raise CorruptStoreError(f"{gp}/{rel}/zarr.json: a group, not an array")
        want = _expected_metadata(self.layout, self.meta.row_width, self.meta.dtype, self.meta.format)
        got = arr.metadata.to_dict()
        shape = got.pop("shape")
        wshape = (None, self.meta.row_width) if rel == "hidden" else (None, 4) if rel == f"index/{CRC_ARRAY}" else (None,)
        if len(shape) != len(wshape) or tuple(shape[1:]) != wshape[1:]:
            raise CorruptStoreError(f"{gp}/{rel}/zarr.json: shape {list(shape)} is not [rows"
                                    + "".join(f", {w}" for w in wshape[1:]) + "]")
        if self.checksummed and got != want[rel]:
            diff = sorted(k for k in set(got) | set(want[rel]) if got.get(k) != want[rel].get(k))
            raise CorruptStoreError(f"{gp}/{rel}/zarr.json: array metadata differs from the store's layout "
                                    f"({', '.join(diff)}): damaged or from another store")
        return arr

    def group_path(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{WRITERS}/{name}"

    def hidden_shard(self, name: str, k: int) -> shard.ShardFile:
        """Direct reads of hidden shard ``k`` of writer group ``name`` (``direct_io`` stores)."""
        return shard.ShardFile(shard.shard_path(self.group_dir(name), k), self.layout, self.meta.row_width, k)

    def group_dir(self, name: str) -> Path | None:
        """The directory of a writer group of a local store; None for remote stores."""
        local = _local(self.path)
        return None if local is None else local / WRITERS / name

    def committed(self, name: str) -> Commit:
        """(rows, sequences) committed in a writer group."""
        c = self.group(name).attrs.get(COMMIT_ATTR)
        if c is None:
            raise CorruptStoreError(f"{self.group_path(name)}: no commit record (zarr.json)")
        problem = commit_problem(c, self.meta.uid if self.checksummed else None)
        if problem:
            raise CorruptStoreError(f"{self.group_path(name)}/zarr.json: {problem}")
        return Commit(c["rows"], c["sequences"])

    def initial_commit(self) -> dict:
        return commit_record(self.meta.uid, 0, 0) if self.checksummed else {"rows": 0, "sequences": 0}

    def lock_group(self, name: str) -> GroupLock | None:
        """Hold writer group ``name`` (an existing group of a local store) for one writer;
        None for object stores, which cannot be locked."""
        d = self.group_dir(name)
        return None if d is None else GroupLock(d, self.group_path(name))

    def held_writers(self) -> list[str]:
        """Writer groups some process holds open for writing now (local stores; an object
        store's writers cannot be seen: [])."""
        if not self.is_local:
            return []
        return [name for name in self.writer_names() if GroupLock.held(self.group_dir(name))]

    def writer(self, name: str, **kwargs):
        from .writer import GroupWriter

        if not self.writable:
            raise StoreError(f"{self.path}: opened read-only")
        return GroupWriter(self, name, **kwargs)

    def create_group(self, name: str):
        """The zarr group of writer group ``name``: created with its arrays and an empty
        commit, or, if it exists, checked (metadata, array lengths against its commit)."""
        if "/" in name or not name:
            raise ValueError(f"invalid writer name {name!r}")
        if name in self.writer_names():  # (which also checks the writers group's metadata)
            g = self.group(name)
            rows, nseq = self.committed(name)
            self._index_group(name, g)
            for rel in list(ROW_ARRAYS) + [f"index/{a}" for a in index_arrays(self.meta.format)]:
                self._check_length(name, rel, self.array(name, rel, g), nseq if rel.startswith("index/") else rows)
            return g
        g = self.root[WRITERS].create_group(name)
        _make_arrays(g, self.layout, self.meta)
        g.attrs[COMMIT_ATTR] = self.initial_commit()
        return g

    def _check_length(self, name: str, rel: str, arr, n: int) -> None:
        if arr.shape[0] < n:
            what = "entries" if rel.startswith("index/") else "rows"
            raise CorruptStoreError(f"{self.group_path(name)}/{rel}: {arr.shape[0]} {what} < {n} committed "
                                    f"({rel}/zarr.json damaged or from another store)")

    # -- reading helpers ----------------------------------------------------------------
    def index(self, name: str, start: int = 0) -> dict[str, np.ndarray]:
        """The committed per-sequence index of a writer group (entries from ``start``),
        checked against its entry checksums (format 3)."""
        return self._read_index(name, start)[1]

    def prompt_ids(self, name: str, start: int = 0) -> tuple[Commit, list[str]]:
        """The group's commit and the prompt ids of its committed sequences from entry
        ``start`` on (checked like ``index``): the next call's ``start`` is the commit's
        ``sequences``."""
        commit = self.committed(name)
        if start >= commit.sequences:  # nothing new: the index is not read
            return commit, []
        commit, idx = self._read_index(name, start, commit)
        return commit, [str(p) for p in idx["prompt_id"].tolist()]

    def _read_index(self, name: str, start: int, commit: Commit | None = None
                    ) -> tuple[Commit, dict[str, np.ndarray]]:
        commit = self.committed(name) if commit is None else commit
        n = commit.sequences
        g = self.group(name)
        gp = self.group_path(name)
        self._index_group(name, g)
        out = {}
        for a in index_arrays(self.meta.format):
            rel = f"index/{a}"
            arr = self.array(name, rel, g)
            self._check_length(name, rel, arr, n)
            try:
                out[a] = arr[start:n]
            except Exception as e:  # noqa: BLE001 — codec errors differ by codec
                raise CorruptStoreError(f"{gp}/{rel}: entries {start}–{n} unreadable ({_why(e)})") from e
        if self.checksummed:
            bad = bad_entries(self.meta.uid, out)
            if bad:
                k = bad[0]
                raise CorruptStoreError(
                    f"{gp}/index: {len(bad)} entr{'y' if len(bad) == 1 else 'ies'} (first: entry {start + k}, "
                    f"sequence {int(out['seq'][k])}) do not match their checksum — an index file "
                    f"(index/{{seq,first_row,length,replica,prompt_id,crc}}/c/…) is damaged or from another store")
        return commit, out

    def _index_group(self, name: str, g) -> None:
        """The index group's own metadata must parse (arrays below it open without it)."""
        gp = self.group_path(name)
        d = self.group_dir(name)
        if d is not None and not (d / "index" / "zarr.json").is_file():
            raise CorruptStoreError(f"{gp}: missing sequence index (index/zarr.json)")
        try:
            idx = g["index"]
            ok = isinstance(idx, zarr.Group) and not idx.attrs.asdict()
        except KeyError:
            raise CorruptStoreError(f"{gp}: missing sequence index (index/zarr.json)") from None
        except Exception as e:  # noqa: BLE001
            raise CorruptStoreError(f"{gp}/index/zarr.json: unreadable group metadata ({_why(e)})") from e
        if not ok:
            raise CorruptStoreError(f"{gp}/index/zarr.json: not the sequence index's group metadata")

    def sequence_check(self, name: str, index: dict | None = None) -> SequenceCheck | None:
        """Checks rows of group ``name`` against their sequences' checksums (None: format < 3)."""
        if not self.checksummed:
            return None
        return SequenceCheck(self.group_path(name), index if index is not None else self.index(name),
                             self.meta.row_width, self.layout.rows_per_shard)

    def info(self) -> "StoreInfo":
        writers = {}
        for name in self.writer_names():
            writers[name] = self.committed(name)
        rows = sum(r for r, _ in writers.values())
        raw = rows * shard.row_bytes(self.meta.row_width)
        return StoreInfo(path=self.path, meta=self.meta, writers=writers, rows=rows,
                         sequences=sum(s for _, s in writers.values()), raw_bytes=raw,
                         stored_bytes=self.stored_bytes())

    def stored_bytes(self) -> int | None:
        if not self.is_local:
            return None
        root = _local(self.path)
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())

    def verify(self, read_rows: bool = True) -> list[str]:
        """Read every committed chunk (crc32c-checked), check that every chunk file a
        committed row needs exists (local stores), that every metadata document says what
        the store's layout defines and that the index and the rows match their checksums
        (format 3) and each other; returns the problems found, each naming its path.
        ``read_rows=False``: all but reading the rows — metadata, commit records, index
        entries and their checksums, chunk files present with intact shard indexes (seconds
        for a store of 100 GB; what the quantize stage checks before it starts)."""
        try:
            names = self.writer_names()
        except StoreError as e:
            return [str(e)]
        problems = self._document_problems(_local(self.path)) if self.checksummed else []
        return problems + [p for name in names for p in self._verify_group(name, read_rows)]

    def _document_problems(self, root: Path | None) -> list[str]:
        """Every zarr.json of a local store, as JSON: zarr reads some damaged keys as if they
        were absent (``zarr_format``, ``dimension_names``…); verify does not."""
        if root is None:
            return []
        problems = []
        for f in sorted(root.rglob("zarr.json")):
            try:
                doc = json.loads(f.read_bytes().decode("utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                problems.append(f"{f}: unreadable metadata document ({_why(e)})")
                continue
            kind = doc.get("node_type") if isinstance(doc, dict) else None
            keys = _DOC_KEYS.get(kind)
            if keys is None or doc.get("zarr_format") != 3 or not set(doc) <= keys[0] or not keys[1] <= set(doc):
                problems.append(f"{f}: not a Zarr v3 {kind or 'node'} metadata document "
                                f"(keys {sorted(doc) if isinstance(doc, dict) else type(doc).__name__})")
        return problems

    def _verify_group(self, name: str, read_rows: bool = True) -> list[str]:
        gp = self.group_path(name)
        try:
            rows, nseq = self.committed(name)
            g = self.group(name)
        except StoreError as e:
            return [str(e)]
        problems, arrays = [], {}
        for a in ROW_ARRAYS:  # rows are read only if every array is there and long enough
            try:
                arr = self.array(name, a, g)
                self._check_length(name, a, arr, rows)
                arrays[a] = arr
            except StoreError as e:
                problems.append(str(e))
        idx = None
        try:
            idx = self.index(name)
        except StoreError as e:
            problems.append(str(e))
        if len(arrays) < len(ROW_ARRAYS):
            return problems
        problems += self._missing_files(name, rows, nseq)
        if not read_rows:
            return problems
        lay, step = self.layout, self.layout.rows_per_chunk
        direct = self.direct_io  # direct reads: they also catch a missing shard
        check = self.sequence_check(name, idx) if idx is not None else None
        seq_col = np.empty(rows, dtype=np.int64)
        mismatches: list[str] = []
        hidden = None  # the shard file being read
        for r0 in range(0, rows, step):
            r1 = min(r0 + step, rows)
            cols = {}
            for a in ROW_ARRAYS:
                try:
                    if direct and a == "hidden":
                        k = r0 // lay.rows_per_shard
                        if hidden is None or hidden.k != k:
                            hidden = self.hidden_shard(name, k)
                        cols[a] = np.empty((r1 - r0, self.meta.row_width), np.uint16)
                        hidden.read_rows(r0, r1, cols[a])
                    else:
                        cols[a] = arrays[a][r0:r1]
                except Exception as e:  # noqa: BLE001 — codec errors differ by codec
                    problems.append(str(e) if isinstance(e, StoreError) else  # (names its file already)
                                    f"{gp}/{a}: rows {r0}–{r1} unreadable (chunk {r0 // step}): {type(e).__name__}: {e}")
                    if a == "hidden":
                        hidden = None
            if "seq" in cols:
                seq_col[r0:r1] = cols["seq"]
            if check is not None and len(cols) == len(ROW_ARRAYS):
                for k, a, b in check.spans(r0, r1):
                    mismatches += check.settle(k, a, b, check.piece(cols, r0, a, b), cols["seq"][a - r0:b - r0])
        if len(mismatches) > 8:  # one line per damaged sequence is enough for the first few
            mismatches = mismatches[:8] + [f"{gp}: … and {len(mismatches) - 8} more sequences that do not match "
                                           "their checksums"]
        problems += mismatches
        if idx is None:
            return problems
        first, length = idx["first_row"], idx["length"]
        if nseq and (first[0] != 0 or np.any(first[1:] != first[:-1] + length[:-1])):
            problems.append(f"{gp}/index: sequences are not contiguous from row 0")
        if int(length.sum()) != rows:
            problems.append(f"{gp}/index: lengths sum to {int(length.sum())}, committed rows {rows}")
        if np.any(length <= 0):
            problems.append(f"{gp}/index: empty sequence entries")
        elif not problems and check is None:
            expect = np.repeat(idx["seq"], length)
            if len(expect) == rows and not np.array_equal(expect, seq_col):
                problems.append(f"{gp}/seq: row sequence ids disagree with the index")
        return problems

    def _missing_files(self, name: str, rows: int, nseq: int) -> list[str]:
        """Chunk files committed rows need (a missing one would read as zeros: stores of
        this format write every chunk, empty or not), and their shard indexes. Local stores only."""
        d = self.group_dir(name)
        if d is None or self.meta.format < 2:
            return []
        lay, gp = self.layout, self.group_path(name)
        shards = -(-rows // lay.rows_per_shard)
        want = [(shard.shard_key(k), k * lay.rows_per_shard) for k in range(shards)]
        want += [(f"{a}/c/{k}", k * lay.rows_per_shard) for a in ROW_ARRAYS[1:] for k in range(shards)]
        missing = []
        for rel, r0 in want:
            if not (d / rel).is_file():
                missing.append(f"{gp}/{rel}: missing chunk file (rows from {r0})")
                continue
            try:  # every row array is sharded alike: its shard index at the end of the file
                shard.shard_index(d / rel, lay.chunks_per_shard)
            except StoreError as e:
                missing.append(f"{e} (rows from {r0})")
        ichunks = -(-nseq // lay.index_rows_per_chunk)
        for a in index_arrays(self.meta.format):
            key = "/0" if a == CRC_ARRAY else ""  # index/crc is [M, 4]: one chunk column
            missing += [f"{gp}/index/{a}/c/{c}{key}: missing chunk file" for c in range(ichunks)
                        if not (d / "index" / a / "c" / f"{c}{key}").is_file()]
        return missing


@dataclass
class StoreInfo:
    path: str
    meta: StoreMeta
    writers: dict[str, Commit]
    rows: int
    sequences: int
    raw_bytes: int
    stored_bytes: int | None

    @property
    def ratio(self) -> float | None:
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else None

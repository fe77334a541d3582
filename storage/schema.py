"""What a capture store is: metadata, layout settings, array names, errors.

Layout (Zarr v3)::

    <root>/zarr.json                  attrs["requant_store"] = StoreMeta (format, model, ...)
    <root>/writers/<writer>/zarr.json attrs["requant_commit"] = {"rows": N, "sequences": M}
        hidden       uint16 [N, hc_mult*hidden]   bf16 bit patterns (bit-exact; see below)
        next_token   int32  [N]   token that follows this row's position (MTP input pairing)
        position     int32  [N]
        seq          int64  [N]   sequence id of the row
        index/seq, index/first_row, index/length, index/replica, index/prompt_id   [M]
        index/crc    uint32 [M, 4]  per sequence: crc32c of its hidden, next_token and position
                     bytes, and of its index entry (format 3; see checksum.py)

bf16: zarr-python has no bfloat16 data type (not even ml_dtypes' one; benchmarks/storage_bench.py
--probe-bf16 asks the installed zarr), so rows are stored as their uint16 bit patterns with
``attrs["dtype"] = "bfloat16"``: bit-exact, readable by any Zarr v3 reader;
``Batch.hidden_torch()`` views them back without a copy. The ``hidden`` shards' bytes are
shard.py's. Rows of one sequence are contiguous and in position order.
Only rows below the committed count are part of the store; a writer commits whole
sequences after their data and index are written.

Format 3 binds the files together so that a damaged or swapped file is found, not read:
the store metadata carries a random ``uid`` and a crc32c of itself (``requant_store_crc32c``),
every commit record names the uid and carries a crc32c, and every sequence's index entry a
crc32c over its rows and entry (checksum.py). Readers check them; ``verify`` checks all.
"""
from __future__ import annotations

import datetime as _dt
import uuid
from dataclasses import asdict, dataclass, field

FORMAT_VERSION = 3
# Format 1 skips chunks equal to the fill value: it reads the same, only `verify` cannot
# tell a missing chunk file from an empty one there.
# Format 2 has no checksums beyond the chunks' own: a swapped file or edited metadata reads.
READABLE_FORMATS = (1, 2, 3)
CHECKSUMMED = 3  # first format with the store uid and metadata/sequence checksums
ROOT_ATTR = "requant_store"
ROOT_CRC_ATTR = "requant_store_crc32c"
COMMIT_ATTR = "requant_commit"
WRITERS = "writers"
ROW_ARRAYS = ("hidden", "next_token", "position", "seq")
INDEX_ARRAYS = ("seq", "first_row", "length", "replica", "prompt_id")
CRC_ARRAY = "crc"  # index/crc, format 3


def index_arrays(fmt: int) -> tuple[str, ...]:
    return INDEX_ARRAYS + ((CRC_ARRAY,) if fmt >= CHECKSUMMED else ())


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("requant")
    except PackageNotFoundError:
        return "dev"


class DamagedInputError(Exception):
    """An input file is damaged or does not belong with the others (a capture store's file,
    a checkpoint shard, a config): the message names the file and what is wrong. The
    ``requant`` CLI prints it as one line and exits with status 2."""


class StoreError(Exception):
    """Base class: every storage error names the path it concerns."""


class NotAStoreError(StoreError):
    pass


class IncompatibleStoreError(StoreError):
    pass


class CorruptStoreError(StoreError, DamagedInputError):
    pass


@dataclass
class StoreMeta:
    """Store-level metadata, fixed at creation."""

    hidden_size: int
    hc_mult: int = 1
    model: str = ""
    revision: str = ""
    capture_point: str = "target_pre_head"
    dtype: str = "bfloat16"
    requant_version: str = field(default_factory=lambda: _version())
    created_at: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat())
    provenance: dict = field(default_factory=dict)
    format: int = FORMAT_VERSION
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)  # binds the store's files (format 3)

    @property
    def row_width(self) -> int:
        return self.hidden_size * self.hc_mult

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, path: str) -> "StoreMeta":
        if data.get("format") not in READABLE_FORMATS:
            raise IncompatibleStoreError(
                f"{path}: store format {data.get('format')!r}, this requant reads formats "
                f"{', '.join(map(str, READABLE_FORMATS))} (written by requant {data.get('requant_version', '?')})")
        known = {f for f in cls.__dataclass_fields__}
        try:
            meta = cls(**{"uid": ""} | {k: v for k, v in data.items() if k in known})  # older formats: no uid
        except TypeError as e:  # a required field missing
            raise CorruptStoreError(f"{path}/zarr.json: store metadata incomplete ({e})") from None
        for name in ("hidden_size", "hc_mult", "format"):
            v = getattr(meta, name)
            if type(v) is not int or v <= 0:
                raise CorruptStoreError(f"{path}/zarr.json: store metadata {name} = {v!r}, not a positive integer")
        if meta.format >= CHECKSUMMED and not (isinstance(meta.uid, str) and len(meta.uid) == 32):
            raise CorruptStoreError(f"{path}/zarr.json: store metadata uid = {meta.uid!r}, not a store id")
        return meta


@dataclass(frozen=True)
class Layout:
    """Chunking and compression (defaults chosen by benchmarks/storage_bench.py)."""

    rows_per_chunk: int = 1024     # 32 MiB chunks of DSV4 rows (4×4096 bf16): few files,
    chunks_per_shard: int = 1      # large reads
    compressor: str = "zstd"       # zstd | blosc-lz4 | blosc-zstd | none
    level: int = 1
    shuffle: str = "shuffle"       # for blosc: noshuffle | shuffle | bitshuffle
    index_rows_per_chunk: int = 4096

    @property
    def rows_per_shard(self) -> int:
        return self.rows_per_chunk * self.chunks_per_shard

    def codecs(self) -> list:
        import zarr.codecs as zc

        if self.compressor == "zstd":
            comp = [zc.ZstdCodec(level=self.level)]
        elif self.compressor.startswith("blosc-"):
            comp = [zc.BloscCodec(cname=self.compressor.split("-", 1)[1], clevel=self.level,
                                  shuffle=self.shuffle, typesize=2)]
        elif self.compressor == "none":
            comp = []
        else:
            raise ValueError(f"unknown compressor {self.compressor!r}")
        return comp + [zc.Crc32cCodec()]  # checksum every stored chunk

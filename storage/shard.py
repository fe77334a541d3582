"""The shard codec of a writer group's ``hidden`` array: Zarr v3 sharding, written and read
here without zarr-python (whose single event-loop thread serialises all chunk I/O of a
process), byte for byte what zarr's sharding codec writes and reads.

A shard file holds ``chunks_per_shard`` chunks of ``rows_per_chunk`` rows::

    chunk 0 body ‖ crc32c(body) ‖ chunk 1 body ‖ crc32c ‖ … ‖ index ‖ crc32c(index)

A body is the chunk's rows (uint16, little-endian; an edge chunk padded with zeros to whole
size) zstd-compressed, or raw for ``compressor="none"``. The index holds one (offset,
nbytes) uint64 pair per chunk — nbytes including the 4-byte crc32c — and ``EMPTY`` for both
where a chunk is not stored (it reads as the fill value). Other compressors (blosc) go
through zarr-python.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import crc32c
import numcodecs.zstd as nzstd
import numpy as np

from .schema import Layout, StoreError

EMPTY = 2**64 - 1  # index entry of a chunk that is not stored
CODECS = ("zstd", "none")  # compressors this module encodes and decodes


def row_bytes(width: int) -> int:
    """Raw bytes of one row over the row arrays: hidden (uint16 × width), next_token and
    position (int32), seq (int64)."""
    return 2 * width + 4 + 4 + 8


def direct(layout: Layout) -> bool:
    """Whether this module can encode and decode the shards of ``layout``."""
    return layout.compressor in CODECS


def shard_key(k: int) -> str:
    """Hidden shard ``k``'s file in its writer group (zarr's default chunk key)."""
    return f"hidden/c/{k}/0"


def shard_path(group_dir: str | Path, k: int) -> Path:
    return Path(group_dir) / shard_key(k)


def index_nbytes(layout: Layout) -> int:
    return 16 * layout.chunks_per_shard + 4


def crc_ok(data, stored: bytes) -> bool:
    return crc32c.crc32c(data).to_bytes(4, "little") == bytes(stored)


# -- encoding -------------------------------------------------------------------------------
def encode_chunk(rows: np.ndarray, layout: Layout, width: int) -> tuple:
    """(body, crc32c bytes) of one chunk of ``rows`` (at most ``rows_per_chunk``; fewer are
    padded with the fill value, as zarr stores edge chunks whole)."""
    rpc = layout.rows_per_chunk
    chunk = rows
    if rows.shape[0] < rpc:
        chunk = np.zeros((rpc, width), dtype=np.uint16)
        chunk[:rows.shape[0]] = rows
    chunk = np.ascontiguousarray(chunk, dtype="<u2")
    body = (nzstd.compress(chunk, layout.level) if layout.compressor == "zstd"
            else memoryview(chunk.reshape(-1).view(np.uint8)))
    return body, crc32c.crc32c(body).to_bytes(4, "little")


def encode_shard(rows: np.ndarray, nrows: int, layout: Layout, width: int,
                 cached: dict[int, tuple] | None = None) -> tuple[list[tuple], bytes, dict[int, tuple]]:
    """The first ``nrows`` rows of a shard as (chunk blobs, index bytes with its crc32c,
    the blobs of its complete chunks). ``cached``: complete chunks' blobs of an earlier
    encoding of the same rows (a partial shard rewritten with more rows reuses them)."""
    cached = cached or {}
    rpc = layout.rows_per_chunk
    index = np.full((layout.chunks_per_shard, 2), EMPTY, dtype="<u8")
    blobs, complete, off = [], {}, 0
    for j in range(layout.chunks_per_shard):
        a, b = j * rpc, min((j + 1) * rpc, nrows)
        if a >= nrows:
            break  # not stored: reads as the fill value
        blob = cached[j] if b - a == rpc and j in cached else encode_chunk(rows[a:b], layout, width)
        if b - a == rpc:
            complete[j] = blob
        blobs.append(blob)
        n = memoryview(blob[0]).nbytes + 4
        index[j] = (off, n)
        off += n
    ib = index.tobytes()
    return blobs, ib + crc32c.crc32c(ib).to_bytes(4, "little"), complete


def write_shard(path: Path, rows: np.ndarray, nrows: int, layout: Layout, width: int,
                cached: dict[int, tuple] | None = None, durable: bool = True) -> dict[int, tuple]:
    """Encode and write a shard file as one atomic replace (tmp file + rename; fsynced with
    ``durable``): a committed shard that shares the file with new rows is never torn.
    Returns the blobs of its complete chunks (``encode_shard``)."""
    blobs, index, complete = encode_shard(rows, nrows, layout, width, cached)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{threading.get_ident()}.partial")
    try:
        with open(tmp, "wb") as f:
            for body, crc in blobs:
                f.write(body)
                f.write(crc)
            f.write(index)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # disk full, I/O error: the committed shard stays as it was
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"writing {path}: {e.strerror or e}") from e
    return complete


# -- decoding -------------------------------------------------------------------------------
def shard_index(path: str | Path, n: int) -> np.ndarray:
    """The (offset, nbytes) index of a shard file of ``n`` chunks (index at the end,
    crc32c-checked), its entries within the file: a cut or damaged shard is a ``StoreError``."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - (16 * n + 4)))
            tail = f.read()
    except FileNotFoundError:
        raise StoreError(f"{path}: shard file missing") from None
    if len(tail) != 16 * n + 4 or not crc_ok(tail[:-4], tail[-4:]):
        raise StoreError(f"{path}: shard index damaged (truncated file or checksum mismatch)")
    index = np.frombuffer(tail[:-4], dtype="<u8").reshape(n, 2)
    stored = index[:, 0] != np.uint64(EMPTY)
    if np.any(index[stored, 0] + index[stored, 1] > size - len(tail)):
        raise StoreError(f"{path}: shard index points past the end of the file (truncated or damaged)")
    return index


class ShardFile:
    """Reads of one hidden shard file: each chunk is pread, crc32c-checked and zstd-decoded
    straight into the caller's array (all three release the GIL, so pool threads read
    chunks in parallel)."""

    def __init__(self, path: str | Path, layout: Layout, width: int, k: int):
        self.k = k
        self.rows_per_chunk, self.first_row = layout.rows_per_chunk, k * layout.rows_per_shard
        self.width = width
        self.path = str(path)
        self.compressed = layout.compressor == "zstd"
        self.index = shard_index(self.path, layout.chunks_per_shard)
        self.index_bytes = index_nbytes(layout)

    def read_rows(self, r0: int, r1: int, out: np.ndarray) -> int:
        """Rows [r0, r1) of one chunk of this shard into ``out``; returns the bytes read."""
        j = (r0 - self.first_row) // self.rows_per_chunk
        off, nbytes = (int(v) for v in self.index[j])
        if off == EMPTY:
            raise StoreError(f"{self.path}: chunk {j} missing")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            blob = os.pread(fd, nbytes, off)
        finally:
            os.close(fd)
        body = memoryview(blob)[:-4]
        if len(blob) != nbytes or not crc_ok(body, blob[-4:]):
            raise StoreError(f"{self.path}: chunk {j} checksum mismatch (corrupted or truncated)")
        c0 = self.first_row + j * self.rows_per_chunk
        whole = r0 == c0 and r1 - r0 == self.rows_per_chunk and out.flags.c_contiguous
        if not self.compressed:
            chunk = np.frombuffer(body, dtype="<u2").reshape(self.rows_per_chunk, self.width)
            out[...] = chunk[r0 - c0:r1 - c0]
        elif whole:
            nzstd.decompress(body, out)  # straight into the caller's array
        else:  # an edge chunk (stored padded) or a read starting mid-chunk
            chunk = np.empty((self.rows_per_chunk, self.width), dtype=np.uint16)
            nzstd.decompress(body, chunk)
            out[...] = chunk[r0 - c0:r1 - c0]
        return nbytes

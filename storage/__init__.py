"""requant.storage — crash-safe, chunked Zarr v3 capture stores for MTP-layer inputs.

    store = CaptureStore.create("runs/cap", StoreMeta(hidden_size=4096, hc_mult=4, model=...))
    with store.writer("replica0-rank0") as w:            # background pipeline, bounded queue
        w.append_sequence(seq_id, hidden_bf16, next_token, position, prompt_id="…")
        w.flush()                                         # optional: commit now
    reader = StoreReader(["runs/cap", "s3://bucket/other"])  # many stores/groups
    for batch in reader.batches(max_bytes=4 << 30, shuffle=True, seed=0):
        x = batch.hidden_torch()                          # [rows, 4*4096] torch.bfloat16, no copy
    for seq in reader.sequences(max_bytes=4 << 30): ...   # whole sequences, in order

Modules: schema.py (metadata, layout, array names, errors), store.py (``CaptureStore``: open,
create, writer groups, index, verify), writer.py (``GroupWriter``), reader.py
(``StoreReader``), shard.py (the ``hidden`` shards' codec), checksum.py (format-3 checksums),
durable.py (fsync), cli.py (``requant store``).

API:
- ``CaptureStore.create(path, meta, layout=Layout(), exist_ok=False)`` / ``.open(path, mode)``;
  ``.writer(name, **opts) -> GroupWriter``; ``.committed(name) -> Commit(rows, sequences)``;
  ``.index(name)``; ``.prompt_ids(name, start) -> (Commit, ids)`` (entries committed since
  ``start``); ``.held_writers()`` (groups a writer holds now); ``.info() -> StoreInfo``;
  ``.verify() -> list[str]`` (problems).
- ``GroupWriter.append_sequence(seq_id, hidden, next_token, position, prompt_id="", replica=0)``
  takes ``hidden`` [T, hc_mult*H] or [T, hc_mult, H] as torch.bfloat16 (any device) or
  numpy uint16 bf16 bit patterns; ``flush(wait=True)``; ``close()``; ``stats``.
- ``StoreReader(stores, writers=None, threads=None)``: ``batches(max_rows, max_bytes, shuffle,
  seed, prefetch) -> Batch``; ``sequences(max_rows, max_bytes, prefetch) -> SequenceRows``.
  Rows come back as numpy uint16 bf16 bit patterns (numpy has no bfloat16; zarr 3.1 and
  3.4 have no bfloat16 data type either); ``hidden_torch()`` / ``as_bf16_tensor`` view
  them as torch.bfloat16 without a copy.
- Errors: ``StoreError`` and its kinds ``NotAStoreError``, ``IncompatibleStoreError``,
  ``CorruptStoreError`` (also a ``DamagedInputError``, the project's "damaged input" error);
  bad appends raise ``ValueError``. Every message names the path and what is wrong.
- Integrity (format 3, checksum.py): the store metadata, every commit record and every
  sequence's index entry and rows carry checksums bound to the store's uid; readers check
  the rows they read (``check=False`` skips it), ``verify()`` checks everything,
  ``verify(read_rows=False)`` all but the rows (seconds; the quantize stage runs it first).

`requant store info PATH` / `requant store verify PATH` inspect and check a store.
"""
from .reader import Batch, SequenceRows, StoreReader, as_bf16_tensor
from .schema import (CorruptStoreError, DamagedInputError, IncompatibleStoreError, Layout, NotAStoreError,
                     StoreError, StoreMeta)
from .store import CaptureStore, Commit, StoreInfo
from .writer import GroupWriter, WriterStats

__all__ = ["as_bf16_tensor", "Batch", "CaptureStore", "Commit", "CorruptStoreError", "DamagedInputError", "GroupWriter",
           "IncompatibleStoreError",
           "Layout", "NotAStoreError", "SequenceRows", "StoreError", "StoreInfo", "StoreMeta",
           "StoreReader", "WriterStats"]

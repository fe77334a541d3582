"""requant.storage — crash-safe, chunked Zarr v3 capture stores for MTP-layer inputs.

    store = CaptureStore.create("runs/cap", StoreMeta(hidden_size=4096, hc_mult=4, model=...))
    with store.writer("replica0-rank0") as w:            # background thread, bounded queue
        w.append_sequence(seq_id, hidden_bf16, next_token, position, prompt_id="…")
    reader = StoreReader(["runs/cap", "s3://bucket/other"])  # many stores/groups
    for batch in reader.batches(max_bytes=256 << 20, shuffle=True, seed=0): ...
    for seq in reader.sequences(): ...                    # whole sequences, in order

`requant store info PATH` / `requant store verify PATH` inspect and check a store.
"""
from .reader import Batch, SequenceRows, StoreReader, as_bf16_tensor
from .schema import (CorruptStoreError, IncompatibleStoreError, Layout, NotAStoreError, StoreError,
                     StoreMeta)
from .store import CaptureStore, StoreInfo
from .writer import GroupWriter, WriterStats

__all__ = ["as_bf16_tensor", "Batch", "CaptureStore", "CorruptStoreError", "GroupWriter", "IncompatibleStoreError",
           "Layout", "NotAStoreError", "SequenceRows", "StoreError", "StoreInfo", "StoreMeta",
           "StoreReader", "WriterStats"]

"""Replay memory defaults (torch-free, so the CLI can show them without importing torch).

Sized from DSV4-Flash runs on one GPU: 16,384 rows per MTP-block call peaked at 48 GiB of
device memory (17 GiB of it the w1/w3 Hessians); feeding that many rows takes ~8 GiB of host
memory (the store reader holds three 0.5 GiB batches plus 16 threads' decode buffers in its
half, the other half groups whole sequences for full replay).
"""
MAX_BYTES = 8 << 30   # host memory for the rows being replayed, per worker
MAX_ROWS = 16384      # rows per block call (bounds the replay's device memory)

# The replay folds its fp32 partial into the exact int64 sums every FOLD_ROWS rows of a
# partition (the default partition's size: one fold each), FOLD_EXPERTS experts at a time, so
# the partial is one chunk of experts (DSV4-Flash: 1.3 GB), not a whole fp32 set (21.5 GB).
FOLD_ROWS = 65536
FOLD_EXPERTS = 16

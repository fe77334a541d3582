"""Replay memory defaults (torch-free, so the CLI can show them without importing torch).

``MAX_ROWS`` bounds the replay's device memory (the block's activations grow with the rows per
call: ``memory.py`` models them); ``MAX_BYTES`` the host memory of the rows being fed (the
store reader holds half of it in batches and decode buffers, the other half groups whole
sequences for full replay). Sized for DSV4-Flash on one GPU.
"""
MAX_BYTES = 8 << 30   # host memory for the rows being replayed, per worker
MAX_ROWS = 16384      # rows per block call (bounds the replay's device memory)

# The replay folds its fp32 partial into the exact int64 sums every FOLD_ROWS rows of a
# partition (the default partition's size: one fold each), FOLD_EXPERTS experts at a time, so
# the partial is one chunk of experts (DSV4-Flash: 1.3 GB), not a whole fp32 set (21.5 GB).
FOLD_ROWS = 65536
FOLD_EXPERTS = 16

"""Writer process for the crash test: appends deterministic sequences forever (until killed),
resuming after whatever the store has committed."""
import sys

import numpy as np

from requant.storage import CaptureStore, Layout, StoreMeta

WIDTH = 2 * 32


def sequence(seq: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seq)
    t = 3 + (seq * 7) % 41
    return (rng.integers(0, 65536, (t, WIDTH), dtype=np.uint16),
            rng.integers(0, 50000, t).astype(np.int32), np.arange(t, dtype=np.int32))


def main(path: str) -> None:
    store = CaptureStore.create(path, StoreMeta(hidden_size=32, hc_mult=2),
                                Layout(rows_per_chunk=32, chunks_per_shard=4), exist_ok=True)
    w = store.writer("w0", flush_rows=40, queue_size=4)
    seq = store.committed("w0")[1]
    print(f"resume {seq}", flush=True)
    while True:
        h, nt, pos = sequence(seq)
        w.append_sequence(seq, h, nt, pos, prompt_id=f"prompt-{seq}", replica=seq % 3)
        seq += 1


if __name__ == "__main__":
    main(sys.argv[1])

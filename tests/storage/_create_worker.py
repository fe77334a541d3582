"""A process that creates (or opens) a store and writes one group: several at once share one store."""
import numpy as np

from requant.storage import CaptureStore, StoreMeta


def create_and_write(path: str, i: int, barrier, out) -> None:
    barrier.wait()  # all at once, as a job's replicas open the store at start-up
    s = CaptureStore.create(path, StoreMeta(hidden_size=8), exist_ok=True)
    with s.writer(f"replica{i}") as w:
        w.append_sequence(0, np.zeros((3, 8), np.uint16), np.arange(3), np.arange(3))
    out.put(s.meta.uid)

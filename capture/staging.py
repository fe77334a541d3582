"""Host staging buffers for hooked tensors: device → (pinned) host copies that never block
the forward on a CUDA device, and a fixed memory budget.

A hook copies a step's rows into a free slot with ``non_blocking=True`` and records an
event; the writer thread waits on the event, reads the slot and releases it. When every
slot is in use the hook waits (back-pressure, counted in ``blocked_seconds``) — rows are
never dropped. Slots are allocated once: pinned allocation is slow, and a fixed pool is
what bounds capture's host memory.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch


@dataclass
class Slot:
    hidden: torch.Tensor      # [rows, width] bfloat16
    input_ids: torch.Tensor   # [rows] int64
    positions: torch.Tensor   # [rows] int64
    rows: int = 0             # rows filled for the current step
    event: object = None      # torch.cuda.Event when the source was on a CUDA device
    pooled: bool = True       # False: a one-off buffer for an oversized step

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


class HostStaging:
    """``slots`` buffers of ``rows_per_slot`` rows × ``width`` bf16 each (+ ids, positions)."""

    def __init__(self, width: int, rows_per_slot: int, slots: int = 4, pin: bool | None = None):
        if width <= 0 or rows_per_slot <= 0 or slots <= 0:
            raise ValueError(f"staging needs positive width/rows/slots, got {width}/{rows_per_slot}/{slots}")
        self.width, self.rows_per_slot = width, rows_per_slot
        self.pin = torch.cuda.is_available() if pin is None else pin  # pinning needs a CUDA runtime
        self._free = [self._alloc(rows_per_slot) for _ in range(slots)]
        self._cv = threading.Condition()
        self.blocked_seconds = 0.0
        self.oversized = 0
        self.bytes = slots * rows_per_slot * (2 * width + 16)
        self._side = None

    def _alloc(self, rows: int, pooled: bool = True) -> Slot:
        kw = {"pin_memory": self.pin}
        return Slot(torch.empty(rows, self.width, dtype=torch.bfloat16, **kw),
                    torch.empty(rows, dtype=torch.int64, **kw), torch.empty(rows, dtype=torch.int64, **kw),
                    pooled=pooled)

    def stage(self, hidden: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor,
              side_stream: bool = False) -> Slot:
        """Start copying [T, width] rows (any float dtype; cast to bf16) and their ids/positions;
        ``side_stream``: copy a CUDA ``hidden`` on a side stream (fresh tensors only)."""
        t = hidden.shape[0]
        if hidden.shape[1] != self.width:
            raise ValueError(f"capture: rows are {hidden.shape[1]} wide, the store expects {self.width}")
        if t > self.rows_per_slot:  # larger than the configured max tokens per forward
            slot = self._alloc(t, pooled=False)
            self.oversized += 1
        else:
            slot = self._acquire()
        slot.rows = t
        cuda = hidden.is_cuda
        # ids/positions (bytes per token) always on the current stream: vLLM refills their
        # buffers on it at the next step.
        slot.input_ids[:t].copy_(input_ids, non_blocking=cuda)
        slot.positions[:t].copy_(positions, non_blocking=cuda)
        if not cuda:
            slot.hidden[:t].copy_(hidden)
            slot.event = None
            return slot
        if side_stream:
            # The rows' copy runs beside the next kernels instead of in front of them. Only
            # for tensors each forward allocates anew: record_stream keeps the allocator from
            # reusing their memory until the copy is done; a buffer that is rewritten in
            # place would race.
            cur = torch.cuda.current_stream(hidden.device)
            side = self._side_stream(hidden.device)
            side.wait_stream(cur)
            with torch.cuda.stream(side):
                slot.hidden[:t].copy_(hidden, non_blocking=True)
                slot.event = torch.cuda.Event()
                slot.event.record(side)
            hidden.record_stream(side)
        else:
            slot.hidden[:t].copy_(hidden, non_blocking=True)
            slot.event = torch.cuda.Event()
            slot.event.record()
        return slot

    def _side_stream(self, device) -> "torch.cuda.Stream":
        if self._side is None:
            self._side = torch.cuda.Stream(device)
        return self._side

    def _acquire(self) -> Slot:
        with self._cv:
            if not self._free:
                t0 = time.perf_counter()
                while not self._free:
                    self._cv.wait()
                self.blocked_seconds += time.perf_counter() - t0
            return self._free.pop()

    def release(self, slot: Slot) -> None:
        if not slot.pooled:
            return
        with self._cv:
            self._free.append(slot)
            self._cv.notify()

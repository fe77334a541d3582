"""requant.capture — stream hooked tensors into a capture store without stalling the forward.

    cap = open_capturer("runs/cap", StoreMeta(hidden_size=H, hc_mult=hc), "replica0", rows_per_step=max_batched_tokens)
    # or any RowSink: Capturer(store.writer("replica0"), width=hc * H, rows_per_step=...)
    cap.add_step(req_ids, counts, hidden, input_ids, positions)   # from a hook: copy + enqueue only
    cap.finish(req_id, prompt_and_output_ids)                      # the request's whole sequence is written
    cap.close(); cap.stats  # rows, bytes, sequences, dropped_sequences (0), blocked_seconds, ...
    Capturer(..., status=PipelineStatus(path).publisher("point"))  # committed / pending, for a drain
"""
from .assembler import IncompleteSequence, Sequence, SequenceAssembler
from .capturer import Capturer, CaptureStats, open_capturer
from .sink import RowSink, open_store_sink
from .staging import HostStaging
from .status import PipelineStatus, PointState, read_status

__all__ = ["Capturer", "CaptureStats", "HostStaging", "IncompleteSequence", "PipelineStatus", "PointState",
           "RowSink", "Sequence", "SequenceAssembler", "open_capturer", "open_store_sink", "read_status"]

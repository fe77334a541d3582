"""requant.capture — stream hooked tensors into a capture store without stalling the forward.

    cap = Capturer(store.writer("replica0"), width=hc_mult * hidden, rows_per_step=max_batched_tokens)
    cap.add_step(req_ids, counts, hidden, input_ids, positions)   # from a hook: copy + enqueue only
    cap.finish(req_id, prompt_and_output_ids)                      # the request's whole sequence is written
    cap.close(); cap.stats  # rows, bytes, sequences, dropped_sequences (0), blocked_seconds, ...
    Capturer(..., status=PipelineStatus(path).publisher("point"))  # committed / pending, for a drain
"""
from .assembler import IncompleteSequence, Sequence, SequenceAssembler
from .capturer import Capturer, CaptureStats
from .sink import RowSink
from .staging import HostStaging
from .status import PipelineStatus, read_status

__all__ = ["Capturer", "CaptureStats", "HostStaging", "IncompleteSequence", "PipelineStatus", "RowSink",
           "Sequence", "SequenceAssembler", "read_status"]

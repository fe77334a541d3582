"""vLLM general plugin: capture the target model's pre-head states into a capture store.

Registered under the ``vllm.general_plugins`` entry point, so vLLM calls ``register()`` in
every process it starts; nothing happens unless ``REQUANT_CAPTURE=<store path or URL>`` is
set. Then, in each worker, after the model loads, a forward hook on the target CausalLM
copies its output — the final hidden states, which vLLM hands the MTP layer as
``previous_hidden_states`` — for every scheduled token.

Row bookkeeping: a forward's rows are the scheduled tokens of the persistent batch's
requests in batch order (``input_batch.req_ids`` × ``num_scheduled_tokens``). Rows are kept
per request *by position*, so a recomputed (preempted) or re-verified position overwrites
its earlier row. When vLLM drops a finished request's state, its token list (prompt +
output) is known: positions 0..n−2 are written as one sequence with ``next_token`` =
tokens[p+1], after checking each row's input token against that list (rows of rejected
speculative tokens fail the check and are counted, not written).

This first version captures DeepSeek-V3-style targets (``target_pre_head``); it requires
eager mode and no prefix caching (cached prompt positions would never be computed).
Environment: ``REQUANT_CAPTURE`` (store), ``REQUANT_CAPTURE_WRITER`` (writer group name;
default ``<host>-<pid>``), ``REQUANT_CAPTURE_MODEL`` (model name for the store metadata).
"""
from __future__ import annotations

import atexit
import os
import socket
import threading

ENV_STORE = "REQUANT_CAPTURE"


def register() -> None:
    """Entry point: patch nothing unless capture is requested."""
    if not os.environ.get(ENV_STORE):
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_requant_capture", False):
        return
    execute_model = GPUModelRunner.execute_model
    removed = GPUModelRunner._on_request_state_removed
    runners = [GPUModelRunner]
    try:  # the CPU runner overrides load_model
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
        runners.append(CPUModelRunner)
    except ImportError:
        pass
    for cls in runners:
        if "load_model" in cls.__dict__:
            cls.load_model = _with_capture(cls.__dict__["load_model"])

    def execute_model_with_capture(self, scheduler_output, *args, **kwargs):
        cap = getattr(self, "_requant", None)
        if cap is not None:
            cap.step = scheduler_output
        return execute_model(self, scheduler_output, *args, **kwargs)

    def removed_with_capture(self, req_id, req_state, *args, **kwargs):
        cap = getattr(self, "_requant", None)
        if cap is not None and req_state is not None:
            cap.finish(req_id, req_state)
        return removed(self, req_id, req_state, *args, **kwargs)

    GPUModelRunner.execute_model = execute_model_with_capture
    GPUModelRunner._on_request_state_removed = removed_with_capture
    GPUModelRunner._requant_capture = True


def _with_capture(load_model):
    def load_model_with_capture(self, *args, **kwargs):
        out = load_model(self, *args, **kwargs)
        self._requant = _Capture(self)
        return out
    return load_model_with_capture


class _Capture:
    """Per-worker capture state: pending rows per request, the store writer, counters."""

    def __init__(self, runner):
        from requant.storage import CaptureStore, StoreMeta

        self.runner = runner
        self.step = None
        self.pending: dict[str, dict[int, tuple]] = {}
        self.seq = 0
        self.rejected_rows = 0
        self.lock = threading.Lock()
        if not runner.model_config.enforce_eager:
            raise RuntimeError("requant capture needs eager mode (enforce_eager=True / --enforce-eager): "
                               "forward hooks do not run inside CUDA graphs or torch.compile'd code")
        if runner.cache_config.enable_prefix_caching:
            raise RuntimeError("requant capture needs prefix caching off (--no-enable-prefix-caching): "
                               "cached prompt positions are never computed, so their rows would be missing")
        # The top-level CausalLM's forward returns the final hidden states (logits are computed
        # separately); hook it rather than the decoder stack, which vLLM may torch.compile
        # (a compiled module's own hooks never fire).
        target = runner.get_model()
        hidden = runner.model_config.get_hidden_size()
        try:
            from vllm.distributed import get_tensor_model_parallel_rank
            self.writes = get_tensor_model_parallel_rank() == 0  # states are replicated after all-reduce
        except Exception:  # noqa: BLE001 — no distributed state: single rank
            self.writes = True
        url = os.environ[ENV_STORE]
        meta = StoreMeta(hidden_size=hidden, hc_mult=1, capture_point="target_pre_head",
                         model=os.environ.get("REQUANT_CAPTURE_MODEL", runner.model_config.model))
        self.store = CaptureStore.create(url, meta, exist_ok=True)  # errors out early on a bad store
        name = os.environ.get("REQUANT_CAPTURE_WRITER", f"{socket.gethostname()}-{os.getpid()}")
        self.writer = self.store.writer(name) if self.writes else None
        target.register_forward_hook(self._hook, with_kwargs=True)
        # Flush before the interpreter shuts thread pools down (plain atexit runs too late
        # for the writer's encode pool and zarr's I/O loop); atexit stays as a fallback.
        register_early = getattr(threading, "_register_atexit", None)
        (register_early or atexit.register)(self.close)

    def _hook(self, module, args, kwargs, output) -> None:
        if not self.writes or self.step is None:
            return
        hidden = output[0] if isinstance(output, tuple) else output
        ids = kwargs.get("input_ids", args[0] if args else None)
        pos = kwargs.get("positions", args[1] if len(args) > 1 else None)
        if ids is None or pos is None:
            return
        req_ids = list(self.runner.input_batch.req_ids)
        counts = [self.step.num_scheduled_tokens.get(r, 0) for r in req_ids]
        total = sum(counts)
        if total == 0 or hidden.shape[0] < total:
            return  # a warm-up or dummy run, not scheduled tokens
        h = hidden[:total].detach().to("cpu", copy=True)
        ids = ids[:total].to("cpu").tolist()
        pos = pos[:total].to("cpu").tolist()
        with self.lock:
            start = 0
            for r, n in zip(req_ids, counts):
                rows = self.pending.setdefault(r, {})
                for i in range(start, start + n):
                    rows[pos[i]] = (h[i], ids[i])
                start += n

    def finish(self, req_id: str, state) -> None:
        import torch

        with self.lock:
            rows = self.pending.pop(req_id, None)
        if not self.writes or not rows:
            return
        tokens = list(state.prompt_token_ids or []) + list(state.output_token_ids)
        n = len(tokens) - 1  # the last sampled token is never fed through the model
        good = [p for p in range(n) if p in rows and rows[p][1] == tokens[p]]
        self.rejected_rows += len(rows) - len(good)
        if len(good) != n:
            raise RuntimeError(f"requant capture: request {req_id} has rows for {len(good)} of {n} positions")
        hidden = torch.stack([rows[p][0] for p in range(n)])
        self.writer.append_sequence(self.seq, hidden, torch.tensor(tokens[1:]), torch.arange(n),
                                    prompt_id=req_id)
        self.seq += 1

    def close(self) -> None:
        """Flush at exit: requests still held by the runner (vLLM reports a request finished
        only on the *next* step, which never comes for the last batch) are complete then."""
        if self.writer is None:
            return
        for req_id in list(self.pending):
            state = self.runner.requests.get(req_id)
            if state is not None:
                self.finish(req_id, state)
        self.writer.close()
        self.writer = None

"""vLLM general plugin: stream capture points of a live server into capture stores.

Registered under the ``vllm.general_plugins`` entry point, so vLLM calls ``register()`` in
every process it starts (front end, engine core, workers); it does nothing unless
``REQUANT_CAPTURE`` names a store. Then, in each worker, right after the model (and the
MTP drafter) loads, the configured capture points (``hooks/points.py``) are resolved on
the real module tree — picked by the architecture and the Python module of the model class
actually built (vLLM builds DeepSeek-V4 from a different tree per platform). A point that
matches nothing, a missing MTP drafter, a mode the point cannot be read in, prefix caching,
async scheduling or an unusable store stop the server before it serves. Only
tensor-parallel rank 0 writes (states are replicated after the all-reduce). vLLM's V1 model
runner only: a server on Model Runner V2 (the GPU default with Triton) is refused at
start-up (``VLLM_USE_V2_MODEL_RUNNER=0``).

Compilation: target-model points are emitted after the runner's model call returns
(``GPUModelRunner._model_forward``), outside torch.compile'd code and CUDA graphs, so they
run with compilation and CUDA graphs on. Their hidden state is the root's output, a buffer
the model fills itself (DSV4's ``_mtp_hidden_buffer``), or a hook inside the forward that
only copies into a stash allocated here, before graph capture (captured graphs replay the
copy). A hook inside a module vLLM torch.compiles is refused unless ``--enforce-eager``
(the compiled artifact, possibly loaded from vLLM's cache, would not contain it). Drafter
points (``mtp_input``) hook the MTP layer inside the drafter and need ``--enforce-eager``.
Such a refusal (``EagerRequired``) is also written as JSON to ``REQUANT_CAPTURE_REFUSAL``
when set, so a capture job can restart the server eager.

Row bookkeeping (vLLM V1): a forward's rows are the scheduled tokens of the persistent
batch's requests in batch order (``input_batch.req_ids`` × ``num_scheduled_tokens``), taken
when the target forward starts. The MTP layer's first call after a target forward uses the
same layout (vLLM's padded drafter batch); later draft steps (k > 1) are not MTP inputs of
target states and are skipped. Rows are kept per request and written when vLLM drops the
request's state (finished or aborted) — then its full token list is known — by
``requant.capture`` (recomputed / rejected positions resolved there; see assembler.py).
Requests still running at shutdown are written at exit.

Environment:
  REQUANT_CAPTURE          store path or URL (required to switch capture on)
  REQUANT_CAPTURE_POINTS   comma-separated points (default ``target_pre_head``); with more than
                           one, each goes to ``<store>/<point>``
  REQUANT_CAPTURE_WRITER   writer group name (default ``<host>-<pid>``)
  REQUANT_CAPTURE_REPLICA  replica number recorded per sequence (default 0)
  REQUANT_CAPTURE_MODEL    model name for the store metadata (default: the served model)
  REQUANT_CAPTURE_STATS    file to write the capture counters to (JSON) at exit
  REQUANT_CAPTURE_SLOTS    host staging slots of max_num_batched_tokens rows each (default 8):
                           the bound on capture's in-flight host memory
  REQUANT_CAPTURE_STATUS   file the writing worker keeps current with what its pipelines have
                           committed and still hold (capture/status.py): what a drain waits on
  REQUANT_TEST_COMMIT_DELAY_S  test hook, never for production: commits come this many seconds
                           late (a slow store), to test that a drain waits for them
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
from dataclasses import dataclass

ENV_STORE = "REQUANT_CAPTURE"
ENV_REFUSAL = "REQUANT_CAPTURE_REFUSAL"
ENV_STATUS = "REQUANT_CAPTURE_STATUS"
ENV_TEST_COMMIT_DELAY = "REQUANT_TEST_COMMIT_DELAY_S"
POINT_NAMES = ("target_pre_head", "mtp_input")
log = logging.getLogger("requant.hooks")
_ACTIVE: list["WorkerCapture"] = []  # this process's worker captures (close_all)


@dataclass(frozen=True)
class PluginConfig:
    store: str
    points: tuple[str, ...] = ("target_pre_head",)
    writer: str = ""
    replica: int = 0
    model: str = ""
    stats_file: str = ""
    slots: int = 8
    refusal_file: str = ""   # where an EagerRequired refusal is reported (JSON)
    status_file: str = ""    # where the pipelines' committed / pending state is kept (JSON)
    test_commit_delay_s: float = 0.0

    @classmethod
    def from_env(cls, env=os.environ) -> "PluginConfig | None":
        store = env.get(ENV_STORE, "")
        if not store:
            return None
        points = tuple(p.strip() for p in env.get("REQUANT_CAPTURE_POINTS", "target_pre_head").split(",") if p.strip())
        bad = [p for p in points if p not in POINT_NAMES]
        if bad or not points or len(set(points)) != len(points):
            raise ValueError(f"REQUANT_CAPTURE_POINTS={env.get('REQUANT_CAPTURE_POINTS')!r}: expected distinct "
                             f"names from {', '.join(POINT_NAMES)}")
        ints = {}
        for key, default in (("REQUANT_CAPTURE_REPLICA", 0), ("REQUANT_CAPTURE_SLOTS", 8)):
            try:
                ints[key] = int(env.get(key, default))
            except ValueError:
                raise ValueError(f"{key}={env[key]!r} is not an integer") from None
        if ints["REQUANT_CAPTURE_SLOTS"] < 1:
            raise ValueError("REQUANT_CAPTURE_SLOTS must be at least 1")
        delay = env.get(ENV_TEST_COMMIT_DELAY, "0")
        try:
            delay_s = float(delay)
        except ValueError:
            delay_s = -1.0
        if not 0 <= delay_s < float("inf"):  # (NaN too)
            raise ValueError(f"{ENV_TEST_COMMIT_DELAY}={delay!r}: expected a finite number of seconds >= 0")
        return cls(store, points, env.get("REQUANT_CAPTURE_WRITER", ""), ints["REQUANT_CAPTURE_REPLICA"],
                   env.get("REQUANT_CAPTURE_MODEL", ""), env.get("REQUANT_CAPTURE_STATS", ""),
                   ints["REQUANT_CAPTURE_SLOTS"], env.get(ENV_REFUSAL, ""), env.get(ENV_STATUS, ""), delay_s)

    def store_for(self, point: str) -> str:
        return self.store if len(self.points) == 1 else f"{self.store.rstrip('/')}/{point}"


def register() -> None:
    """Entry point (every vLLM process): validate the configuration, then extend the model
    runner so capture starts in each worker after its model loads."""
    cfg = PluginConfig.from_env()  # a bad setting fails here, before any engine starts
    if cfg is None:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_requant_capture", False):
        return
    # vLLM has no post-load callback for plugins: wrap the runner methods capture needs
    # (load_model; each step's scheduler output; sampling, after which finished requests are
    # known; the request-state removal hook).
    runners = [GPUModelRunner]
    try:  # the CPU runner overrides load_model
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
        runners.append(CPUModelRunner)
    except ImportError:
        pass
    for cls in runners:
        if "load_model" in cls.__dict__:
            cls.load_model = _after_load(cls.__dict__["load_model"], cfg)
    try:  # Model Runner V2 (vLLM's default on GPUs with Triton) keeps its batch differently
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as RunnerV2

        def refuse(self, *args, **kwargs):
            raise RuntimeError("requant capture supports vLLM's V1 model runner; this server uses Model Runner "
                               "V2 — start it with VLLM_USE_V2_MODEL_RUNNER=0")
        RunnerV2.load_model = refuse
    except Exception:  # noqa: BLE001 — not importable here (CPU build): V2 is never used
        pass
    execute_model = GPUModelRunner.execute_model
    model_forward = GPUModelRunner._model_forward
    sample_tokens = GPUModelRunner.sample_tokens
    removed = GPUModelRunner._on_request_state_removed

    def execute_model_with_capture(self, scheduler_output, *args, **kwargs):
        cap = getattr(self, "_requant", None)
        if cap is not None:
            cap.scheduler_output = scheduler_output
        return execute_model(self, scheduler_output, *args, **kwargs)

    def model_forward_with_capture(self, *args, **kwargs):
        cap = getattr(self, "_requant", None)
        if cap is None:
            return model_forward(self, *args, **kwargs)
        cap.before_forward()
        out = model_forward(self, *args, **kwargs)
        cap.after_forward(args, kwargs, out)
        return out

    def sample_tokens_with_capture(self, *args, **kwargs):
        out = sample_tokens(self, *args, **kwargs)
        cap = getattr(self, "_requant", None)
        if cap is not None:
            cap.after_sampling()
        return out

    def removed_with_capture(self, req_id, req_state, *args, **kwargs):
        cap = getattr(self, "_requant", None)
        if cap is not None and req_state is not None:
            cap.finish(req_id, req_state)
        return removed(self, req_id, req_state, *args, **kwargs)

    GPUModelRunner.execute_model = execute_model_with_capture
    GPUModelRunner._model_forward = model_forward_with_capture
    GPUModelRunner.sample_tokens = sample_tokens_with_capture
    GPUModelRunner._on_request_state_removed = removed_with_capture
    GPUModelRunner._requant_capture = True


def _after_load(load_model, cfg: PluginConfig):
    def load_model_with_capture(self, *args, **kwargs):
        from .points import EagerRequired

        out = load_model(self, *args, **kwargs)
        try:
            self._requant = WorkerCapture(self, cfg)
        except EagerRequired as e:
            report_refusal(cfg.refusal_file, e)
            raise
        return out
    return load_model_with_capture


def report_refusal(path: str, err: Exception) -> None:
    """Write ``{"needs": "--enforce-eager", "error": ...}`` to ``path`` (if set), whole or not
    at all: the server is about to exit and whoever started it reads why."""
    if not path:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"needs": "--enforce-eager", "error": str(err)}, f)
    os.replace(tmp, path)


class WorkerCapture:
    """One worker's capture: hooks on the loaded model, a Capturer per point (rank 0)."""

    def __init__(self, runner, cfg: PluginConfig):
        from requant.capture import PipelineStatus

        from .attach import attach
        from .points import row_shape

        self.runner, self.cfg = runner, cfg
        self.scheduler_output = None
        self.layout: tuple[list[str], list[int]] | None = None
        self.mtp_pending = False
        self.written: set[str] = set()  # requests already written when sampling finished them
        self.checked: dict[str, int] = {}  # output tokens already stop-checked, per request
        self.paused = False
        mc = runner.model_config
        if getattr(runner, "use_async_scheduling", False):
            raise RuntimeError("requant capture needs async scheduling off (--no-async-scheduling): with it the "
                               "worker holds placeholder ids for sampled tokens, so rows cannot be paired with "
                               "their next tokens")
        if runner.cache_config.enable_prefix_caching:
            raise RuntimeError("requant capture needs prefix caching off (--no-enable-prefix-caching): "
                               "cached prompt positions are never computed, so their rows would be missing")
        try:
            from vllm.distributed import get_tensor_model_parallel_rank
            self.writes = get_tensor_model_parallel_rank() == 0
        except Exception:  # noqa: BLE001 — no distributed state: a single rank
            self.writes = True
        arch = (mc.architectures or [type(runner.get_model()).__name__])[0]
        max_tokens = runner.scheduler_config.max_num_batched_tokens
        # Every point is resolved and hooked before any store is created: a refused start
        # writes nothing.
        self.capturers: dict = {}
        self.boundary = []  # target attachments, emitted after each target forward
        shapes = {}
        for name in cfg.points:
            point, root, hidden_ref = self._point(name, arch)
            hidden, hc = row_shape(point, mc.hf_config)
            shapes[name] = (hidden, hc, point.ids_offset)
            target = point.tree == "target"
            fresh = point.fresh and hidden_ref.at_root and mc.enforce_eager  # else a buffer graphs rewrite
            att = attach(point, root, self._on_rows(name, not target, fresh), hidden * hc, boundary=target,
                         stash_rows=max_tokens, dtype=mc.dtype, device=runner.device)
            if target:
                self.boundary.append(att)
        self.status = PipelineStatus(cfg.status_file) if self.writes and cfg.status_file else None
        for name, (hidden, hc, ids_offset) in shapes.items():
            self.capturers[name] = self._capturer(name, hidden, hc, ids_offset) if self.writes else None
        # Flush before the interpreter shuts thread pools down (plain atexit runs too late
        # for the store writer's encode pool); atexit stays as a fallback.
        (getattr(threading, "_register_atexit", None) or atexit.register)(self.close)
        _ACTIVE.append(self)

    def _point(self, name: str, arch: str):
        """(point, tree root, hidden ref) for ``name`` on this runner's model; refuses a point
        this server cannot give rows for, naming the setting to change."""
        from .points import POINTS, CapturePointError, EagerRequired, find_point, needs_eager, resolve_hidden

        runner = self.runner
        target = runner.get_model()
        if name in {p.name for p in POINTS if p.tree == "drafter"}:
            drafter = getattr(getattr(runner, "drafter", None), "model", None)
            if drafter is None:
                raise CapturePointError(f"capture point {name!r} reads the MTP layer, but this server runs no MTP "
                                        "speculative decoding (--speculative-config "
                                        "'{\"method\":\"mtp\",\"num_speculative_tokens\":1}'); "
                                        "target_pre_head captures the same rows without it")
            if needs_eager(name) and not runner.model_config.enforce_eager:
                raise EagerRequired(f"capture point {name!r} hooks the MTP layer inside the drafter, which vLLM "
                                        "compiles and runs in CUDA graphs, where hooks do not run: start vLLM with "
                                        "--enforce-eager, or capture target_pre_head (the same rows), which works "
                                        "with compilation on")
            point = find_point(name, "vllm", arch, type(drafter).__module__)
            ref, _ = resolve_hidden(point, drafter, f"capture point {name!r} hidden")
            return point, drafter, ref
        point = find_point(name, "vllm", arch, type(target).__module__)
        ref, _ = resolve_hidden(point, target, f"capture point {name!r} hidden")
        if not runner.model_config.enforce_eager:
            refusal = compile_refusal(name, ref, target, runner.compilation_config.mode)
            if refusal:
                raise EagerRequired(refusal)
        return point, target, ref

    def _capturer(self, name: str, hidden: int, hc: int, ids_offset: int):
        from requant.capture import open_capturer
        from requant.storage import StoreMeta

        mc, cfg = self.runner.model_config, self.cfg
        spec = self.runner.speculative_config
        meta = StoreMeta(hidden_size=hidden, hc_mult=hc, capture_point=name, model=cfg.model or mc.model,
                         provenance={"engine": "vllm", "vllm": _vllm_version(),
                                     "speculative": getattr(spec, "method", None) if spec else None})
        return open_capturer(cfg.store_for(name), meta, cfg.writer or f"{socket.gethostname()}-{os.getpid()}",
                             rows_per_step=self.runner.scheduler_config.max_num_batched_tokens,
                             ids_offset=ids_offset, slots=cfg.slots, replica=cfg.replica,
                             status=self.status.publisher(name) if self.status else None,
                             test_commit_delay_s=cfg.test_commit_delay_s)

    def before_forward(self) -> None:
        """The runner is about to call the target model."""
        self._take_layout()

    def after_forward(self, args: tuple, kwargs: dict, output) -> None:
        """The runner's target-model call returned: emit the target points' rows."""
        if self.layout is None:
            return
        for att in self.boundary:
            att.after_forward(args, kwargs, output)

    def _take_layout(self) -> None:
        so, self.scheduler_output = self.scheduler_output, None  # dummy/profile runs: none
        self.mtp_pending = so is not None
        if so is None or self.paused:
            self.layout = None
            return
        req_ids = list(self.runner.input_batch.req_ids)
        self.layout = (req_ids, [so.num_scheduled_tokens.get(r, 0) for r in req_ids])

    def _on_rows(self, name: str, drafter: bool, fresh: bool):
        def on_rows(hidden, ids, positions):
            cap = self.capturers.get(name)
            if cap is None or self.layout is None:
                return
            if drafter:  # only the first MTP call of a step takes target states
                if not self.mtp_pending:
                    return
                self.mtp_pending = False
            req_ids, counts = self.layout
            cap.add_step(req_ids, counts, hidden, ids, positions, fresh=fresh)
        return on_rows

    def after_sampling(self) -> None:
        """Write requests this step finished as soon as their last token is sampled: vLLM
        tells the worker only on the *next* step, which an idle server never runs."""
        if not self.writes or self.paused:
            return
        max_len = self.runner.max_model_len
        for req_id in self.runner.input_batch.req_ids:
            state = self.runner.requests.get(req_id)
            if req_id in self.written or state is None:
                continue
            tokens = finished_tokens(state, max_len, self.checked.get(req_id, 0))
            self.checked[req_id] = len(state.output_token_ids)
            if tokens is not None:
                self.written.add(req_id)
                self._finish(req_id, tokens)

    def finish(self, req_id: str, state) -> None:
        """vLLM dropped the request's state (finished — e.g. a stop string, which only the
        front end sees — or aborted)."""
        self.checked.pop(req_id, None)
        if req_id in self.written:
            self.written.discard(req_id)
            return
        self._finish(req_id, list(state.prompt_token_ids or []) + list(state.output_token_ids))

    def _finish(self, req_id: str, tokens: list[int]) -> None:
        for cap in self.capturers.values():
            if cap is not None:
                cap.finish(req_id, tokens)

    def close(self) -> None:
        """At exit: requests still held by the runner (vLLM reports a request finished only
        on the *next* step, which never comes for the last batch) are complete now."""
        caps = [c for c in self.capturers.values() if c is not None]
        if not caps:
            return
        for req_id, state in list(self.runner.requests.items()):
            self.finish(req_id, state)
        self.written.clear()
        stats = {}
        for name, cap in self.capturers.items():
            if cap is not None:
                cap.close()
                stats[name] = cap.stats.as_dict()
        self.capturers = {}
        log.info("requant capture stats: %s", stats)
        if self.cfg.stats_file:
            with open(self.cfg.stats_file, "w") as f:
                json.dump(stats, f)


def finished_tokens(state, max_model_len: int, start: int = 0) -> list[int] | None:
    """Prompt + output ids if the scheduler will stop this request on what it has sampled
    (the checks of vLLM's ``check_stop``, token by token as the scheduler applies them to
    speculative tokens, from output token ``start`` on); None while it runs on."""
    sp = state.sampling_params
    if sp is None:  # pooling
        return None
    out = state.output_token_ids
    n_prompt = len(state.prompt_token_ids or ())
    max_tokens = sp.max_tokens if sp.max_tokens is not None else max_model_len - n_prompt
    eos = None if sp.ignore_eos else sp.eos_token_id
    stops = sp.stop_token_ids or ()
    for k in range(start + 1, len(out) + 1):
        t = out[k - 1]
        if t == -1:  # a placeholder (async scheduling; refused at start-up)
            return None
        if (t == eos and eos is not None) or t in stops or n_prompt + k >= max_model_len or k >= max_tokens:
            return list(state.prompt_token_ids or ()) + list(out[:k])
    return None


def pause_all(paused: bool) -> None:
    """Stop (or resume) capturing new steps in this process's workers (in-process engines);
    hooks stay installed. Requests must not straddle a pause: they would be incomplete."""
    for cap in _ACTIVE:
        cap.paused = paused


def close_all() -> None:
    """Write pending requests and close the stores of every worker capture in this process
    (in-process engines: VLLM_ENABLE_V1_MULTIPROCESSING=0); otherwise this happens at exit."""
    while _ACTIVE:
        _ACTIVE.pop().close()


def compile_refusal(name: str, ref, root, mode) -> str | None:
    """Why target point ``name``, read at ``ref`` of ``root``, cannot be captured under vLLM
    compilation mode ``mode`` (None if it can): a hook inside the forward of a module vLLM
    torch.compiles never runs — the compiled artifact, possibly loaded from vLLM's cache, has
    no Python hooks. Root refs and buffers the model fills itself are read after the forward."""
    from vllm.config import CompilationMode

    if ref.at_root or ref.io == "buffer":
        return None
    inside = ""
    if mode == CompilationMode.STOCK_TORCH_COMPILE:
        inside = f"{type(root).__name__} (compilation mode STOCK_TORCH_COMPILE)"
    parts = ref.module.split(".") if ref.module else []
    for i in range(len(parts) + 1):
        sub = ".".join(parts[:i])
        mod = root.get_submodule(sub) if sub else root
        if not inside and getattr(mod, "do_not_compile", True) is False:  # set by vLLM's @support_torch_compile
            inside = f"{sub or '<root>'} ({type(mod).__name__})"
    if not inside:
        return None
    return (f"capture point {name!r} reads {ref.describe()}, inside {inside}, which vLLM torch.compiles (compiled "
            "code runs no Python hooks): start vLLM with --enforce-eager")


def _vllm_version() -> str:
    try:
        import vllm
        return vllm.__version__
    except Exception:  # noqa: BLE001
        return "?"

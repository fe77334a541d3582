"""``QuantizeJob``: what one quantize run is asked to do — the inputs, the replay, the
distribution over workers and the GPTQ options — validated on construction, before any work."""
from __future__ import annotations

from dataclasses import dataclass

from requant.quantizer.core.experts import LowTokenPolicy
from requant.quantizer.core.limits import FOLD_ROWS, MAX_BYTES, MAX_ROWS
from requant.quantizer.stage.distribute import PARALLEL

REPLAYS = ("identity", "full", "both")


@dataclass(frozen=True)
class QuantizeJob:
    stores: list[str]
    master: str
    base: str
    out: str
    replay: str = "identity"        # identity | full | both (both: quantise with full, report the distance)
    workers: int = 1                # workers (GPUs); >1 uses Ray unless use_ray=False
    use_ray: bool | None = None     # None: Ray when workers > 1
    processes: bool = False         # no Ray, workers > 1: one spawned process per worker (GPU g each)
    # data: each worker replays its partitions. replicated: every worker replays every row for its
    # own experts — the same shard, slower at every worker count measured (benchmarks/dp_replay.py,
    # whose anchor it is); not offered on the CLI or the API
    parallel: str = "data"
    partitions: int | None = None   # calibration partitions (None: one per 65,536 rows, ≤ 64); not the worker count
    holdout: float = 0.1            # fraction of prompts held out for the quality figures (0: none)
    holdout_seed: int = 0
    act_order: bool = False
    w2_weighting: str = "none"
    min_tokens: int = 64            # report flags experts below this
    device: str | None = None       # None: cuda if available else cpu
    damp: float = 0.01
    # GPTQ for experts with few calibration tokens (experts.LowTokenPolicy): kind, token_damp's alpha,
    # rtn_below's ratio
    low_tokens: str = LowTokenPolicy().kind
    low_tokens_alpha: float = LowTokenPolicy().alpha
    low_tokens_ratio: float = LowTokenPolicy().ratio
    gptq_batch: int | None = None   # experts per GPTQ batch; None: from the device (fixed per run)
    max_bytes: int = MAX_BYTES      # replay's host memory bound per worker
    max_rows: int | None = MAX_ROWS  # rows per block call (bounds the replay's device memory)
    # per-worker memory the plan must fit (GPU memory on GPUs, host memory on CPUs); None: the
    # GPU's total memory, or this host's memory divided among the workers
    memory_limit: int | None = None
    fold_rows: int = FOLD_ROWS      # rows of a partition per fp32 partial (fixed per job: part of the sums' bits)
    fp8_scale: str = "auto"         # FP8 pass-through scale naming: auto | keep | .scale | .weight_scale_inv | .weight_scale
    ray_retries: int = 2            # retries of a lost worker (Ray task, or spawned process)
    durable: bool = True            # fsync the output before publishing it

    def __post_init__(self):
        if self.replay not in REPLAYS:
            raise ValueError(f"replay must be one of {REPLAYS}, got {self.replay!r}")
        if self.workers < 1:
            raise ValueError(f"workers must be ≥ 1, got {self.workers}")
        if not self.stores:
            raise ValueError("no capture stores given")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.partitions is not None and self.partitions < 1:
            raise ValueError(f"partitions must be ≥ 1, got {self.partitions}")
        if self.memory_limit is not None and self.memory_limit < 1:
            raise ValueError(f"memory_limit must be positive, got {self.memory_limit}")
        if self.fold_rows < 1:
            raise ValueError(f"fold_rows must be ≥ 1, got {self.fold_rows}")
        self.low_token_policy  # a bad policy is refused here, before any work

    @property
    def low_token_policy(self) -> LowTokenPolicy:
        return LowTokenPolicy(self.low_tokens, alpha=self.low_tokens_alpha, ratio=self.low_tokens_ratio)

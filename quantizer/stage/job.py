"""``QuantizeJob``: what one quantize run is asked to do — the inputs, the replay, the
distribution over workers and the GPTQ options — validated on construction, before any work.

It is the one schema of a quantize run: the control plane's and job files' quantize spec
(``orchestrator/spec.py``) is made of its fields, and `requant quantize`'s options
(``quantizer/cli.py``) are generated from them; ``INTERNAL`` fields are for Python callers only.
"""
from __future__ import annotations

import os
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from requant.quantizer.core.experts import POLICIES, LowTokenPolicy
from requant.quantizer.core.limits import FOLD_ROWS, MAX_BYTES, MAX_ROWS
from requant.quantizer.stage.assemble import SCALE_CONVENTIONS
from requant.quantizer.stage.distribute import PARALLEL
from requant.quantizer.stage.replay import WEIGHTINGS

REPLAYS = ("identity", "full", "both")

# Set by Python callers (benchmarks, tests) only: not offered by the CLI or job specs.
INTERNAL = ("parallel", "gptq_batch", "fold_rows", "ray_retries", "durable")


def _one_of(name: str, choices: tuple, what: str | None = None) -> BeforeValidator:
    def check(v):
        if v not in choices:
            raise ValueError(f"{what or name} must be one of {choices}, got {v!r}")
        return v
    return BeforeValidator(check)


def _at_least(name: str, low: int, word: str = "≥ 1") -> AfterValidator:
    def check(v):
        if v is not None and v < low:
            raise ValueError(f"{name} must be {word}, got {v}")
        return v
    return AfterValidator(check)


def _path(v):
    return os.fspath(v) if isinstance(v, os.PathLike) else v


def _some_stores(v: list[str]) -> list[str]:
    if not v:
        raise ValueError("no capture stores given")
    return v


def _fraction(v: float) -> float:
    if not 0.0 <= v < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {v}")
    return v


Path_ = Annotated[str, BeforeValidator(_path)]
_LOW = LowTokenPolicy()


class QuantizeJob(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    stores: Annotated[list[Path_], AfterValidator(_some_stores)] = Field(
        description="capture stores (several: their sequences pooled)")
    master: Path_ = Field(description="checkpoint holding the MTP layer's master weights")
    base: Path_ = Field(description="base checkpoint (sharded, with model.safetensors.index.json)")
    out: Path_ = Field(description="new output directory (must not exist)")
    replay: Annotated[Literal[REPLAYS], _one_of("replay", REPLAYS)] = Field(
        "identity", description="identity: attention sub-layer skipped; full: the real MTP block over whole "
                                "sequences; both: quantise with full, report the Hessian distance")
    workers: Annotated[int, _at_least("workers", 1)] = Field(
        1, description="workers (one GPU each)")
    use_ray: bool | None = Field(None, description="run the workers on Ray (None: when workers > 1)")
    processes: bool = Field(False, description="without Ray, workers > 1: one spawned process per worker, "
                                               "worker g on GPU g")
    # data: each worker replays its partitions. replicated: every worker replays every row for
    # its own experts — the same shard, slower at every worker count measured; the anchor of
    # benchmarks/dp_replay.py
    parallel: Annotated[Literal[PARALLEL], _one_of("parallel", PARALLEL)] = Field(
        "data", description="data: each worker replays its partitions; replicated: every worker every row")
    partitions: Annotated[int | None, _at_least("partitions", 1)] = Field(
        None, description="calibration partitions of whole sequences (default: one per 65,536 rows, at most "
                          "64); fixed per job, not per worker count: more workers than partitions leaves some idle")
    holdout: Annotated[float, AfterValidator(_fraction)] = Field(
        0.1, description="fraction of prompts held out for the held-out error figures (0: none)")
    holdout_seed: int = Field(0, description="seed of the held-out prompt choice")
    act_order: bool = Field(False, description="GPTQ with act-order (lower error, static groups)")
    w2_weighting: Annotated[Literal[WEIGHTINGS], _one_of("w2_weighting", WEIGHTINGS)] = Field(
        "none", description="w2 Hessians: none, or each token weighted by its routing weight")
    min_tokens: int = Field(64, ge=0, description="the report flags experts with fewer routed tokens")
    device: str | None = Field(None, description="cpu or cuda (default: cuda if available)")
    damp: float = Field(0.01, description="GPTQ's relative damp")
    low_tokens: Annotated[Literal[POLICIES], _one_of("low_tokens", POLICIES, "low-token policy")] = Field(
        _LOW.kind, description="GPTQ for experts with few calibration tokens T for an input D wide: damp: the "
                               "fixed damp; token_damp: damp + alpha·D/T; shrink: toward the pooled Hessian of "
                               "all experts, weight T/(T+D); rtn_below: RTN when T < ratio·D")
    low_tokens_alpha: float = Field(_LOW.alpha, ge=0.0, description="token_damp's alpha")
    low_tokens_ratio: float = Field(_LOW.ratio, ge=0.0, description="rtn_below's ratio")
    gptq_batch: Annotated[int | None, _at_least("gptq_batch", 1)] = Field(
        None, description="experts per GPTQ batch; None: from the device (fixed per run)")
    max_bytes: int = Field(MAX_BYTES, description="host memory for the rows being replayed, per worker")
    max_rows: int | None = Field(MAX_ROWS, description="rows per MTP-block call: bounds the replay's device memory")
    memory_limit: Annotated[int | None, _at_least("memory_limit", 1, "positive")] = Field(
        None, description="per-worker memory the plan must fit, checked before any work (GPU memory on GPUs, "
                          "host memory on CPUs; default: the GPU's total memory, or this host's memory / workers)")
    fold_rows: Annotated[int, _at_least("fold_rows", 1)] = Field(
        FOLD_ROWS, description="rows of a partition per fp32 partial (fixed per job: part of the sums' bits)")
    fp8_scale: Annotated[Literal[SCALE_CONVENTIONS], _one_of("fp8_scale", SCALE_CONVENTIONS)] = Field(
        "auto", description="scale naming of FP8 MTP tensors passed through (auto: the base's convention)")
    ray_retries: int = Field(2, description="retries of a lost worker (Ray task, or spawned process)")
    durable: bool = Field(True, description="fsync the output before publishing it")

    @property
    def low_token_policy(self) -> LowTokenPolicy:
        return LowTokenPolicy(self.low_tokens, alpha=self.low_tokens_alpha, ratio=self.low_tokens_ratio)

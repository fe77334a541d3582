"""Job specs (pydantic), one per kind, told apart by ``kind``: what job files hold
(``load_spec``; `requant capture-job --config job.yaml`), what the control plane accepts at
POST /jobs (``JobSpec``) and what its runner reads back (``parse_spec``) — one schema,
validated the same way everywhere. The quantize spec is ``QuantizeJob``'s fields
(quantizer/stage/job.py, also `requant quantize`'s options), the evaluate spec ``EvalJob``'s."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from .evaluate import EvalJob
from .prompts import PromptConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("schedule", check_fields=False)  # the job kinds' cron field
    @classmethod
    def _cron(cls, v):
        return _check_cron(v)


class CoverageSpec(_Strict):
    min_tokens_per_expert: int = Field(..., ge=1)
    max_prompts: int | None = Field(None, ge=1)   # None: the whole prompt source
    master: str | None = None                      # checkpoint whose MTP router is replayed (default: model)


class CaptureSpec(_Strict):
    kind: Literal["capture"] = "capture"
    model: str                                   # checkpoint directory the replicas serve
    store: str                                   # capture store (created by the first replica)
    prompts: PromptConfig = PromptConfig()
    replicas: int = Field(1, ge=1)
    tensor_parallel: int = Field(1, ge=1)
    point: Literal["target_pre_head", "mtp_input"] = "target_pre_head"
    # auto: --enforce-eager only where the point needs it (mtp_input; or the plugin refuses the
    # point on the tree a replica builds: that replica restarts eager); else compiled / CUDA graphs
    enforce_eager: Union[Literal["auto"], bool] = "auto"
    max_model_len: int | None = Field(None, ge=16)
    vllm_args: list[str] = []
    env: dict[str, str] = {}                     # extra environment of every replica
    replica_cpus: float = Field(1.0, ge=0)
    replica_gpus: float | None = Field(None, ge=0)   # None: tensor_parallel on GPU clusters, else 0
    concurrency: int = Field(8, ge=1)            # in-flight requests per replica
    request_timeout_s: float = Field(600.0, gt=0)
    retries: int = Field(4, ge=0)                # connection errors / 503 before the prompt counts as failed
    max_attempts: int = Field(3, ge=1)           # sends of one prompt whose outcome was unknown
    health_timeout_s: float = Field(900.0, gt=0)
    # a replica that, while the job drains, has requests running, no capture status or a capture
    # writer that has not beaten for this long is restarted (never its prompts re-sent while it
    # lives); also how long a start waits for writer groups an earlier run's servers still hold
    drain_timeout_s: float = Field(120.0, gt=0)
    max_replica_restarts: int = Field(3, ge=0)
    ray_address: str | None = None               # None: $RAY_ADDRESS, else a local Ray
    coverage: CoverageSpec | None = None
    ledger: str | None = None                    # default: <store>.ledger.jsonl
    schedule: str | None = None                  # cron (control plane only)

    @model_validator(mode="after")
    def _mtp(self):
        if self.point == "mtp_input" and "--speculative-config" not in self.vllm_args:
            raise ValueError("point mtp_input reads the MTP layer: add --speculative-config "
                             "'{\"method\":\"mtp\",\"num_speculative_tokens\":1}' to vllm_args")
        return self

    @model_validator(mode="after")
    def _eager(self):
        from requant.hooks.points import needs_eager

        if any(a.split("=")[0] in ("--enforce-eager", "--no-enforce-eager") for a in self.vllm_args):
            raise ValueError("vllm_args: set enforce_eager (auto | true | false) instead of passing --enforce-eager")
        if self.enforce_eager is False and needs_eager(self.point):
            raise ValueError(f"point {self.point} is read inside vLLM's MTP drafter, which runs compiled and in CUDA "
                             "graphs where hooks do not run: enforce_eager must be auto or true")
        return self

    def starts_eager(self) -> bool:
        """Whether replicas start with --enforce-eager (auto: where the point needs it on every
        model tree, ``hooks.points.needs_eager``)."""
        from requant.hooks.points import needs_eager

        return self.enforce_eager is True or (self.enforce_eager == "auto" and needs_eager(self.point))


class _QuantizeSpec(_Strict):
    def job(self):
        from requant.quantizer.stage.job import QuantizeJob

        return QuantizeJob(**self.model_dump(exclude={"kind", "schedule"}))


def _quantize_spec():
    """The quantize spec: ``QuantizeJob``'s fields (same types, defaults and checks) but the
    ``INTERNAL`` ones, between ``kind`` and ``schedule``."""
    from pydantic import create_model

    from requant.quantizer.stage.job import INTERNAL, QuantizeJob

    fields = {n: (f.annotation, f) for n, f in QuantizeJob.model_fields.items() if n not in INTERNAL}
    return create_model("QuantizeSpec", __base__=_QuantizeSpec, __module__=__name__,
                        kind=(Literal["quantize"], "quantize"), **fields, schedule=(str | None, None))


QuantizeSpec = _quantize_spec()


class EvaluateSpec(EvalJob, _Strict):
    """``EvalJob``'s fields (same checks), ``out`` required."""
    kind: Literal["evaluate"] = "evaluate"
    out: str = Field(description="result JSON")
    schedule: str | None = None

    def job(self) -> EvalJob:
        return EvalJob(**self.model_dump(exclude={"kind", "schedule"}))


# One spec per job kind, told apart by ``kind``: a bad field is reported for that kind only.
JobSpec = Annotated[Union[CaptureSpec, QuantizeSpec, EvaluateSpec], Field(discriminator="kind")]
_JOB_SPEC = TypeAdapter(JobSpec)


def parse_spec(data: dict) -> CaptureSpec | QuantizeSpec | EvaluateSpec:
    """A job spec of any kind from its JSON form (``ValidationError`` on a bad one)."""
    return _JOB_SPEC.validate_python(data)


def _check_cron(v: str | None) -> str | None:
    if v is None:
        return v
    from croniter import croniter

    if not croniter.is_valid(v):
        raise ValueError(f"schedule {v!r} is not a valid cron expression (e.g. '0 3 * * 1')")
    return v


def load_spec(path: str | Path) -> CaptureSpec | QuantizeSpec | EvaluateSpec:
    """A job config (YAML) of any kind (``kind``, default capture). Relative paths in it are
    relative to the config file; a prompt source only where that file exists (else a hub name)."""
    import yaml
    from pydantic import ValidationError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"job config {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of job settings")
    data.setdefault("kind", "capture")
    base = path.parent

    def rel(v, field):
        if not isinstance(v, str) or "://" in v or os.path.isabs(v):
            return v
        if field in PROMPT_SOURCES and not (base / v).exists():
            return v
        return str(base / v)

    kind = data["kind"]
    for field in PATH_FIELDS.get(kind, ()) if isinstance(kind, str) else ():
        *parents, key = field.split(".")
        holder = data
        for k in parents:
            holder = holder.get(k) if isinstance(holder.get(k), dict) else {}
        if key in holder:
            v = holder[key]
            holder[key] = [rel(x, field) for x in v] if isinstance(v, list) else rel(v, field)
    try:
        return parse_spec(data)
    except ValidationError as e:
        raise ValueError(f"{path}: invalid job config:\n{e}") from None


def load_capture_spec(path: str | Path) -> CaptureSpec:
    spec = load_spec(path)
    if spec.kind != "capture":
        raise ValueError(f"{path}: a capture job config is needed here, not a {spec.kind} one")
    return spec


# -- data root confinement (control plane) -----------------------------------------------

PATH_FIELDS = {"capture": ("model", "store", "ledger", "prompts.source", "coverage.master"),
               "quantize": ("stores", "master", "base", "out"),
               "evaluate": ("checkpoint", "against", "stores", "prompts.source", "store_prompts", "out")}
PROMPT_SOURCES = ("prompts.source", "store_prompts")  # a local file, or a hub dataset name


def confine(spec: JobSpec, root: str | Path) -> JobSpec:
    """Resolve every path of a spec under ``root`` (relative paths are relative to it);
    a path outside it (``..``, absolute elsewhere, symlinks out) → ValueError naming it.
    Hub dataset names (no path separator beyond owner/name, not on disk) pass as they are."""
    root = Path(root).resolve()
    data = spec.model_dump()

    def fix(value: str, name: str) -> str:
        if "://" in value:
            raise ValueError(f"{name}: {value!r}: only paths under the data root are allowed")
        p = Path(value)
        full = (p if p.is_absolute() else root / p).resolve()
        if full != root and root not in full.parents:
            raise ValueError(f"{name}: {value!r} is outside the data root")
        return str(full)

    for field in PATH_FIELDS[spec.kind]:
        parts = field.split(".")
        holder = data
        for k in parts[:-1]:
            holder = holder.get(k) or {}
        key = parts[-1]
        v = holder.get(key)
        if v is None:
            continue
        if field == "prompts.source" and not v.endswith((".parquet", ".jsonl", ".json")) and "/" in v \
                and not v.startswith((".", "/")) and v.count("/") == 1 and not (root / v).exists():
            continue  # a hub dataset name like HuggingFaceH4/ultrachat_200k
        holder[key] = [fix(x, field) for x in v] if isinstance(v, list) else fix(v, field)
    return type(spec).model_validate(data)

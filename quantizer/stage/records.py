"""What the stage's workers hand back: typed records that stay typed until the manifest is
written (``as_dict``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from requant.quantizer.core.experts import TensorRecord


@dataclass
class HeldoutErrors:
    """A written tensor's errors on the held-out prompts' Hessians (``core.heldout``)."""
    tokens_heldout: int
    err_gptq_heldout: float | None
    err_rtn_heldout: float | None
    heldout_not_below_rtn: bool | None


@dataclass
class TensorResult:
    """One quantised tensor: how it was quantised and, with a held-out split, how well."""
    record: TensorRecord
    heldout: HeldoutErrors | None = None

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def path(self) -> str:
        return self.record.path

    @property
    def not_below_rtn(self) -> bool:
        return bool(self.heldout and self.heldout.heldout_not_below_rtn)

    def as_dict(self) -> dict:
        return self.record.as_dict() | (asdict(self.heldout) if self.heldout else {})


@dataclass
class ReplayStep:
    """One worker's fold of some partitions of one phase."""
    rank: int
    phase: int
    split: str
    mode: str
    partitions: list[int]
    rows: int
    bytes_read: int
    seconds: float
    pid: int
    all_experts: bool                # a data-parallel share (the sums of every expert)
    peak: dict[str, int]
    catch_up: bool = False           # a replacement recomputing a finished phase for its experts


@dataclass
class ReduceStep:
    """One worker's part in the collective reduce of one phase."""
    rank: int
    phase: int
    bytes_reduced: int
    seconds: float
    peak: dict[str, int]


@dataclass
class PooledPart:
    """One worker's share of the pooled Hessians the shrink policy pulls toward."""
    parts: tuple[torch.Tensor, torch.Tensor]   # Σ over its experts on the shared grids, int64
    shifts: tuple[int, int]                    # those grids (``hessian.pool_shift``)
    tokens: int                                # the phase's routed tokens of all experts


@dataclass
class WorkerResult:
    rank: int
    experts: list[int]
    tensors: dict[str, torch.Tensor]           # packed, CPU, keyed by checkpoint name
    records: list[TensorResult]                # expert order
    tokens: dict[int, list[int]]               # phase → [n_experts] routed tokens (totals)
    distance: dict[int, tuple[float, float]]   # replay=both: expert → (rel. Frobenius h_in, h_mid)
    seconds: dict[str, float]
    device: str
    pid: int
    memory: dict[str, dict[str, int]] = field(default_factory=dict)  # step → {"device", "host"} peak bytes


@dataclass
class ClusterFacts:
    """The Ray cluster a run used."""
    ray: str                         # Ray's version
    gpus: float
    address: str


@dataclass
class RunOutcome:
    results: list[WorkerResult]              # rank order
    steps: list[ReplayStep | ReduceStep]     # every replay / reduce step, per rank
    walls: dict[str, float]                  # driver wall seconds: "replay <split>/<mode>", "reduce …", "gptq"
    cluster: ClusterFacts | None = None

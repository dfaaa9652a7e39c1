"""Plain settings of the ``train`` and ``eval`` recipe sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

__all__ = ["TrainConfig", "EvalConfig"]


@dataclass
class TrainConfig:
    """The ``train`` section. Every objective trains through the same loop."""

    steps: int = 1000
    batch_size: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: Literal["adam", "adamw"] = "adam"
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup: int = 0
    grad_clip: float = 0.0
    grad_accum: int = 1
    ema: float = 0.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    threads: int = 0
    tune_allocator: bool = True
    cpu: bool = False
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 200
    sample_every: int = 0
    keep_checkpoints: int = 2
    trackers: list = field(default_factory=list)


@dataclass
class EvalConfig:
    """The ``eval`` section: how ``flowkit nll`` and periodic evaluation run."""

    n: int = 20000
    batch_size: int = 5000
    seed: int = 1234
    divergence: Literal["exact", "hutchinson"] = "exact"
    noise: Literal["rademacher", "gaussian"] = "rademacher"
    n_probes: int = 1
    method: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5
    steps: Optional[int] = None
    per_sample_norm: bool = True
    metrics: bool = True
    metric_samples: int = 2000

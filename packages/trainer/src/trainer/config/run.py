"""Typed sections of a training run. Each validates its own fields; :func:`check_run` the combinations."""

from __future__ import annotations

from dataclasses import dataclass, field

from pstate import ParallelConfig

from ..data.build import DataConfig
from ..errors import TrainerError
from ..model import ModelConfig, preset

PRECISIONS = ("fp32", "bf16", "fp16")
DECAYS = ("cosine", "linear", "constant")
ON_NAN = ("stop", "skip")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with decoupled weight decay (not applied to biases, norms and embeddings' padding), a linear
    warmup to ``lr`` then ``decay`` to ``min_lr`` at the last step, and clipping by the global norm."""

    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 0
    decay: str = "cosine"
    clip_grad: float = 1.0

    def __post_init__(self) -> None:
        if self.decay not in DECAYS:
            raise TrainerError(f"optim.decay={self.decay!r}: must be one of {DECAYS}")
        if not 0 <= self.min_lr <= self.lr:
            raise TrainerError(f"optim.min_lr={self.min_lr}: must be in [0, lr={self.lr}]")
        if self.warmup_steps < 0 or self.clip_grad < 0:
            raise TrainerError("optim.warmup_steps and optim.clip_grad must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """The loop: ``steps`` is the total (a resumed run continues to it); global batch =
    ``micro_batch * microbatches * dp``. ``zero``: 0 DDP, 1/2 sharded optimizer, 3 fully sharded.
    ``exit_interval``: save and stop when the step is a multiple of it (the schedule still spans
    ``steps``; a later run with ``load`` continues). ``init_from_hf``: a Hugging Face folder whose
    weights the model starts from (each rank reads only its pieces)."""

    steps: int = 100
    seed: int = 1234
    seq_len: int = 128
    micro_batch: int = 4
    global_batch: int | None = None
    precision: str = "fp32"
    zero: int = 0
    sequence_parallel: bool = False
    cp_attention: str = "ring"
    pipeline_schedule: str = "1f1b"
    recompute: str | None = None
    eval_every: int = 0
    eval_steps: int = 4
    save_every: int = 0
    save: str | None = None
    load: str | None = None
    init_from_hf: str | None = None
    keep: int = 3
    async_save: bool = True
    metrics_file: str | None = None
    tensorboard: str | None = None
    log_every: int = 1
    on_nan: str = "stop"
    exit_interval: int | None = None
    deterministic: bool = False
    comm_report: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "seq_len", "micro_batch", "eval_steps", "log_every", "keep"):
            if getattr(self, name) < 1:
                raise TrainerError(f"train.{name}={getattr(self, name)}: must be >= 1")
        if self.precision not in PRECISIONS:
            raise TrainerError(f"train.precision={self.precision!r}: must be one of {PRECISIONS}")
        if self.zero not in (0, 1, 2, 3):
            raise TrainerError(f"train.zero={self.zero}: must be 0, 1, 2 or 3")
        if self.on_nan not in ON_NAN:
            raise TrainerError(f"train.on_nan={self.on_nan!r}: must be one of {ON_NAN}")
        if self.recompute not in (None, "full", "selective"):
            raise TrainerError(f"train.recompute={self.recompute!r}: must be none, 'full' or 'selective'")


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs: the model, the parallel layout, the loop, the optimizer and the data."""

    model: ModelConfig = field(default_factory=lambda: preset("tiny"))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)

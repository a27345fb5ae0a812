"""Typed sections of a training run. Each validates its own fields; :func:`check_run` the combinations."""

from __future__ import annotations

from dataclasses import dataclass, field

from pstate import ParallelConfig

from ..data.build import DataConfig
from ..errors import TrainerError
from ..model import ModelConfig, preset
from .fields import check_number, check_types

PRECISIONS = ("fp32", "bf16", "fp16")
DECAYS = ("cosine", "linear", "constant")
ON_NAN = ("stop", "skip")
CP_ATTENTION = ("ring", "ulysses")


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
        check_types(self, "optim")
        check_number("optim", "lr", self.lr, above=0)
        check_number("optim", "min_lr", self.min_lr, at_least=0)
        if self.min_lr > self.lr:
            raise TrainerError(
                f"optim.lr={self.lr}: must be >= optim.min_lr={self.min_lr} (the schedule decays from lr to min_lr; "
                "lower min_lr too)"
            )
        check_number("optim", "weight_decay", self.weight_decay, at_least=0)
        check_number("optim", "beta1", self.beta1, at_least=0, below=1)
        check_number("optim", "beta2", self.beta2, at_least=0, below=1)
        check_number("optim", "eps", self.eps, above=0)
        check_number("optim", "clip_grad", self.clip_grad, at_least=0)
        if self.warmup_steps < 0:
            raise TrainerError(f"optim.warmup_steps={self.warmup_steps}: must be >= 0")
        if self.decay not in DECAYS:
            raise TrainerError(f"optim.decay={self.decay!r}: must be one of {DECAYS}")


@dataclass(frozen=True)
class TrainConfig:
    """The loop: ``steps`` is the total (a resumed run continues to it); global batch =
    ``micro_batch * microbatches * dp``. ``zero``: 0 DDP, 1/2 sharded optimizer, 3 fully sharded.
    ``exit_interval``: save and stop when the step is a multiple of it (the schedule still spans
    ``steps``; a later run with ``load`` continues). ``init_from_hf``: a Hugging Face folder whose
    weights the model starts from (each rank reads only its pieces). ``on_nan="stop"`` stops on a
    non-finite loss, or a non-finite gradient that is not an fp16 loss-scale overflow (those steps are
    skipped and counted), or after ``max_skipped_steps`` skipped steps in a row; ``"skip"`` skips any
    such step. ``stall_timeout``: seconds without progress on some rank after which every rank dumps its
    stack and the job stops, naming the stalled rank(s); collectives time out a little later."""

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
    max_skipped_steps: int = 100
    stall_timeout: float = 600.0

    def __post_init__(self) -> None:
        check_types(self, "train")
        for name in ("steps", "seq_len", "micro_batch", "eval_steps", "log_every", "keep", "max_skipped_steps"):
            if getattr(self, name) < 1:
                raise TrainerError(f"train.{name}={getattr(self, name)}: must be >= 1")
        for name in ("global_batch", "exit_interval"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise TrainerError(f"train.{name}={getattr(self, name)}: must be >= 1 (or left out)")
        for name in ("seed", "save_every", "eval_every"):
            if getattr(self, name) < 0:
                raise TrainerError(f"train.{name}={getattr(self, name)}: must be >= 0")
        check_number("train", "stall_timeout", self.stall_timeout, above=0)
        if self.cp_attention not in CP_ATTENTION:
            raise TrainerError(f"train.cp_attention={self.cp_attention!r}: must be one of {CP_ATTENTION}")
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

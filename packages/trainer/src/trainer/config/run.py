"""Typed sections of a training run. Each validates its own fields; :func:`check_run` the combinations."""

from __future__ import annotations

from dataclasses import dataclass, field

from cp_ring import KERNEL_NAMES
from pstate import ParallelConfig

from ..data.build import DataConfig
from ..errors import TrainerError
from ..model import ModelConfig, preset
from .fields import check_number, check_types

PRECISIONS = ("fp32", "bf16", "fp16", "fp8")
FP8_RECIPES = ("current", "delayed", "mxfp8")
GRAD_REDUCE_DTYPES = ("fp32", "bf16")
DECAYS = ("cosine", "linear", "constant")
ON_NAN = ("stop", "skip")
CP_ATTENTION = ("ring", "ulysses", "hierarchical")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with decoupled weight decay (not applied to biases, norms and embeddings' padding), a linear
    warmup to ``lr`` then ``decay`` to ``min_lr`` at the last step, and clipping by the global norm."""

    lr: float = 3e-4
    """peak learning rate, reached at the end of the warmup."""
    min_lr: float = 3e-5
    """learning rate at the last step, where the decay ends (0 <= min_lr <= lr)."""
    weight_decay: float = 0.1
    """AdamW's decoupled weight decay (not applied to biases and norms)."""
    beta1: float = 0.9
    """AdamW's first-moment decay."""
    beta2: float = 0.95
    """AdamW's second-moment decay."""
    eps: float = 1e-8
    """AdamW's denominator epsilon."""
    warmup_steps: int = 0
    """steps of linear warmup from 0 to lr."""
    decay: str = "cosine"
    """how the learning rate falls from lr to min_lr after the warmup."""
    clip_grad: float = 1.0
    """clip gradients to this global norm (0: measure the norm, never clip)."""

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
        ``micro_batch * microbatches * dp``. ``zero``: 0 DDP, 1/2 sharded optimizer, 3 fully sharded (HSDP
    with ``parallel.dp_shard`` below dp: sharded within groups of that many data-parallel ranks).
        ``exit_interval``: save and stop when the step is a multiple of it (the schedule still spans
        ``steps``; a later run with ``load`` continues). ``init_from_hf``: a Hugging Face folder whose
        weights the model starts from (each rank reads only its pieces). ``on_nan="stop"`` stops on a
        non-finite loss, or a non-finite gradient that is not an fp16 loss-scale overflow (those steps are
        skipped and counted), or after ``max_skipped_steps`` skipped steps in a row; ``"skip"`` skips any
        such step. ``stall_timeout``: seconds without progress on some rank after which every rank dumps its
        stack and the job stops, naming the stalled rank(s); collectives time out a little later."""

    steps: int = 100
    """total optimizer steps of the run (a resumed run continues to it)."""
    seed: int = 1234
    """seed of the initialization, the data order and dropout."""
    seq_len: int = 128
    """tokens per sample."""
    micro_batch: int = 4
    """samples per micro-batch on each data-parallel rank."""
    global_batch: int | None = None
    """samples per optimizer step over all ranks, a multiple of micro_batch*dp (default: micro_batch*dp)."""
    precision: str = "fp32"
    """parameter and compute precision. bf16/fp16 with zero 0/1/2: 16-bit weights, fp32 main gradients,
    fp32 master weights and optimizer state (sharded by ZeRO); with zero 3: fp32 shards (the masters)
    gathered in 16 bits. fp16 adds dynamic loss scaling; fp8: bf16 autocast over fp32 parameters, fp8
    matmuls."""
    fp8_recipe: str = "current"
    """fp8 scaling: current (per-tensor, this step's amax), delayed (amax history; te) or mxfp8 (te, Blackwell)."""
    grad_reduce_dtype: str = "fp32"
    """dtype of the data-parallel gradient reduction, every ZeRO stage: fp32 (default; the main gradients')
    or bf16 (half the bytes; the sum is rounded to bf16 before it reaches the fp32 gradients)."""
    peak_tflops: float | None = None
    """peak dense TFLOP/s of one device for MFU (default: the GPU's datasheet figure; measured on CPUs)."""
    zero: int = 0
    """data-parallel sharding: 0 DDP, 1 optimizer states, 2 and gradients, 3 and parameters (FSDP)."""
    sequence_parallel: bool = False
    """split activations outside the TP regions along the sequence over TP ranks (needs tp > 1)."""
    keep_gathered_input: bool = False
    """under sequence_parallel, keep each column-parallel layer's all-gathered input for its backward
    instead of gathering it again there: one all-gather fewer per layer and step, for tp times the
    memory of that input (as DTensor's tensor parallel does; needs sequence_parallel)."""
    cp_attention: str = "ring"
    """context-parallel attention: ring (zigzag), ulysses (all-to-all over heads), or hierarchical (all-to-all over
    heads in groups of parallel.cp_a2a adjacent CP ranks, a ring across the groups)."""
    cp_kernel: str = "auto"
    """ring attention's block kernel: sdpa (PyTorch's fused ops), math (matmul + softmax), auto (sdpa where it runs)."""
    pipeline_schedule: str = "1f1b"
    """pipeline schedule when pp > 1 (interleaved ones need vpp > 1)."""
    moe_overlap: bool = False
    """overlap MoE all-to-alls with another micro-batch's compute (paired 1F1B or dualpipe-v; ep > 1, fp32)."""
    recompute: str | None = None
    """activation recomputation: full (whole layers) or selective (attention core); default: none."""
    eval_every: int = 0
    """evaluate on the validation set every N steps (0: never)."""
    eval_steps: int = 4
    """global batches per evaluation."""
    save_every: int = 0
    """save a checkpoint every N steps (0: only at the end); needs save."""
    save: str | None = None
    """directory for checkpoints (step_NNNNNNNN/ inside); a run resumes from its newest (default: nothing saved)."""
    load: str | None = None
    """checkpoint, or directory of them (the newest), to start from; any layout may have saved it (default: save's)."""
    init_from_hf: str | None = None
    """a Hugging Face model folder whose weights the model starts from, each rank reading its pieces (default: none)."""
    keep: int = 3
    """checkpoints kept under save (older ones are removed)."""
    async_save: bool = True
    """write checkpoints in the background while training goes on."""
    metrics_file: str | None = None
    """append one JSON line per logged step and evaluation to this file (default: none)."""
    tensorboard: str | None = None
    """write TensorBoard scalars to this directory (needs the tensorboard package; default: none)."""
    log_every: int = 1
    """log a step line (and metrics) every N steps."""
    on_nan: str = "stop"
    """on a non-finite loss or gradient norm: stop the run, or skip the step."""
    exit_interval: int | None = None
    """save and stop when the step is a multiple of N; a later run with load continues (default: never)."""
    deterministic: bool = False
    """use only deterministic kernels (torch.use_deterministic_algorithms)."""
    comm_report: bool = False
    """record every collective of the run and print the bytes per step on each parallel axis."""
    max_skipped_steps: int = 100
    """stop after this many skipped steps in a row (fp16 overflows included), whatever on_nan says."""
    stall_timeout: float = 600.0
    """seconds without progress on a rank before every rank dumps its stack and the job stops (exit 3)."""

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
        if self.cp_kernel not in KERNEL_NAMES:
            raise TrainerError(f"train.cp_kernel={self.cp_kernel!r}: must be one of {KERNEL_NAMES}")
        if self.precision not in PRECISIONS:
            raise TrainerError(f"train.precision={self.precision!r}: must be one of {PRECISIONS}")
        if self.fp8_recipe not in FP8_RECIPES:
            raise TrainerError(f"train.fp8_recipe={self.fp8_recipe!r}: must be one of {FP8_RECIPES}")
        if self.grad_reduce_dtype not in GRAD_REDUCE_DTYPES:
            raise TrainerError(
                f"train.grad_reduce_dtype={self.grad_reduce_dtype!r}: must be one of {GRAD_REDUCE_DTYPES}"
            )
        if self.peak_tflops is not None:
            check_number("train", "peak_tflops", self.peak_tflops, above=0)
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

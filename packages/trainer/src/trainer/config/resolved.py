"""``RunPlan``: what a checked run resolved to (layout sizes, HSDP and hierarchical-CP group sizes, the
context-parallel attention, the pipeline's layers per stage, batch arithmetic, dtypes, ZeRO stage,
schedule), computed once by :func:`trainer.config.check_run` and read everywhere else.

The plan is plain data: it is saved in checkpoints as it is (``plan/<field>`` values), and a resumed run
compares the saved plan with its own (:meth:`RunPlan.changes`): a new layout (parallel sizes, micro-batches, ZeRO
stage, schedule) is allowed, since checkpoints load into any layout; a changed global batch, sequence
length or precision changes what is trained and is reported. A checkpoint saved before a field existed
lacks it: it reads back as ``None`` and is not reported as a change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

TRAINING_FIELDS = ("global_batch", "seq_len", "precision", "param_dtype", "compute_dtype", "grad_reduce_dtype")
"""The plan's fields that change what is trained (the samples and tokens of a step, the arithmetic); the
others say how the same step is laid out (sizes, micro-batches, ZeRO stage, schedule): a resumed run may
change those freely."""

PARAM_DTYPES = {"fp32": "fp32", "bf16": "fp32", "fp16": "fp32", "fp8": "fp32"}
"""The stored parameters' dtype per ``train.precision`` where they are the fp32 master weights (ZeRO-3's
shards, fp8's autocast); :func:`param_dtype` gives bf16/fp16 under ZeRO 0/1/2 (fp32 masters kept by the
engine)."""
COMPUTE_DTYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "fp8": "bf16+fp8"}
"""The forward/backward compute dtype per ``train.precision`` (``bf16+fp8``: bf16 with fp8 matmuls)."""
GRID = ("tp", "pp", "vpp", "cp", "ep", "etp", "dp")
"""The sizes that place each rank on the grid (:meth:`RunPlan.grid_sizes`)."""
GRAD_REDUCE_DTYPES = {"fp32": "fp32", "bf16": "fp32", "fp16": "fp32", "fp8": "fp32"}
"""The dtype gradients are accumulated and reduced in per ``train.precision``."""


def param_dtype(precision: str, zero: int) -> str:
    """The stored parameters' dtype: 16-bit weights with bf16 and fp16 under ZeRO 0/1/2 (Megatron's mixed
    precision), else :data:`PARAM_DTYPES`."""
    return precision if precision in ("bf16", "fp16") and zero < 3 else PARAM_DTYPES[precision]


@dataclass(frozen=True)
class RunPlan:
    """A run as it will execute (see the module notes). ``global_batch = micro_batch * microbatches * dp``
    samples per optimizer step; ``schedule`` is the pipeline schedule, ``None`` without pipelining.
    ``dp_shard``: the data-parallel ranks of one ZeRO-3 shard group (HSDP below ``dp``: the parameters are
    replicated across ``dp / dp_shard`` groups; ``dp`` otherwise). ``cp_a2a``: the inner all-to-all group
    of hierarchical context parallelism (1 otherwise). ``cp_attention``: ``ring``, ``ulysses`` or
    ``hierarchical``. ``pipeline_layout``: the layers of each virtual stage when set unevenly, else
    ``None`` (``layers / (pp * vpp)`` each)."""

    world_size: int
    tp: int
    pp: int
    vpp: int
    cp: int
    ep: int
    etp: int
    dp: int
    edp: int
    dp_shard: int
    cp_a2a: int
    cp_attention: str
    pipeline_layout: tuple[int, ...] | None
    micro_batch: int
    microbatches: int
    global_batch: int
    seq_len: int
    precision: str
    param_dtype: str
    compute_dtype: str
    grad_reduce_dtype: str
    zero: int
    sequence_parallel: bool
    schedule: str | None

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step over all ranks."""
        return self.global_batch * self.seq_len

    @property
    def dp_replicate(self) -> int:
        """HSDP: the shard groups each parameter shard is replicated over (1: no HSDP)."""
        return self.dp // self.dp_shard

    def grid_sizes(self) -> dict[str, int]:
        """The sizes that place each rank on the grid (``tp``, ``pp``, ``vpp``, ``cp``, ``ep``, ``etp``, ``dp``):
        two runs with the same ones hold the same stages and slices on the same ranks."""
        return {k: getattr(self, k) for k in GRID}

    def layout_sizes(self) -> dict[str, int]:
        """The parallel sizes a checkpoint records: :meth:`grid_sizes` and the sub-group sizes
        ``dp_shard`` (HSDP) and ``cp_a2a`` (hierarchical CP)."""
        return {**self.grid_sizes(), "dp_shard": self.dp_shard, "cp_a2a": self.cp_a2a}

    def as_dict(self) -> dict[str, Any]:
        """The plan as JSON values (what a checkpoint stores under ``plan/``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunPlan:
        """The plan ``as_dict`` gave (read back from JSON: a list is the tuple it was); fields a later version
        added and an older checkpoint lacks are ``None``."""
        values = {f.name: values.get(f.name) for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def changes(self, saved: RunPlan) -> tuple[list[str], list[str]]:
        """What differs from ``saved``, as ``field old->new`` strings: the layout changes (allowed: sizes,
        micro-batches, ZeRO stage, schedule), then the training changes (:data:`TRAINING_FIELDS`: global
        batch, sequence length, precision; reported)."""
        layout, other = [], []
        for f in fields(self):
            old, new = getattr(saved, f.name), getattr(self, f.name)
            if old != new and old is not None:
                (other if f.name in TRAINING_FIELDS else layout).append(f"{f.name} {old}->{new}")
        return layout, other

    def describe_changes(self, saved: RunPlan) -> str:
        """One line saying how this run differs from the plan that saved the checkpoint."""
        layout, other = self.changes(saved)
        if not layout and not other:
            return "the run plan is the saved one"
        parts = []
        if layout:
            parts.append(f"layout changed ({', '.join(layout)})")
        if other:
            parts.append(f"training changed ({', '.join(other)})")
        return "; ".join(parts)

    def describe(self) -> str:
        """The plan in one line (the start banner and the resume note)."""
        sizes = " x ".join(f"{k} {getattr(self, k)}" for k in ("tp", "cp", "ep", "dp", "pp"))
        vpp = f" (vpp {self.vpp})" if self.vpp > 1 else ""
        stages = f", layers per stage {list(self.pipeline_layout)}" if self.pipeline_layout else ""
        cp = ""
        if self.cp > 1:
            a2a = f" (all-to-all groups of {self.cp_a2a})" if self.cp_attention == "hierarchical" else ""
            cp = f"; {self.cp_attention} attention{a2a}"
        hsdp = f" (HSDP: shard {self.dp_shard} x replicate {self.dp_replicate})" if self.dp_replicate > 1 else ""
        schedule = f", {self.schedule}" if self.schedule else ""
        return (
            f"{self.world_size} ranks = {sizes}{vpp}{stages}{cp}; global batch {self.global_batch} = "
            f"{self.micro_batch} x {self.microbatches} micro-batches x dp {self.dp}, seq {self.seq_len}; params "
            f"{self.param_dtype}, compute {self.compute_dtype}, grad reduce {self.grad_reduce_dtype}; zero "
            f"{self.zero}{hsdp}{schedule}"
        )

"""One layout's full estimate (memory, time, pipeline) and the cluster it runs on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import check_run
from .hardware import Hardware, load_hardware
from .layout import Layout, Workload
from .memory import GIB, Memory, memory
from .pipeline import PipelineCost, pipeline_cost
from .timing import StepTime, model_flops, step_time


@dataclass(frozen=True)
class Cluster:
    """``gpus`` GPUs of a hardware profile (a name or a TOML path); the other fields override the profile."""

    gpus: int
    hardware: str | Hardware = "h100-sxm"
    gpus_per_node: int | None = None
    memory_gib: float | None = None
    peak_tflops: float | None = None
    profile: Hardware = field(init=False, repr=False)

    def __post_init__(self) -> None:
        hw = self.hardware if isinstance(self.hardware, Hardware) else load_hardware(self.hardware)
        hw = hw.with_overrides(
            gpus_per_node=self.gpus_per_node, memory_gib=self.memory_gib, bf16_tflops=self.peak_tflops
        )
        object.__setattr__(self, "profile", hw)


@dataclass(frozen=True)
class Estimate:
    """What one layout costs on one cluster: its memory and time breakdowns and the pipeline's shape."""

    layout: Layout
    work: Workload
    hardware: Hardware
    memory: Memory
    time: StepTime
    pipe: PipelineCost

    @property
    def step_s(self) -> float:
        return self.time.step

    @property
    def memory_gib(self) -> float:
        return self.memory.total / GIB

    @property
    def fits(self) -> bool:
        return self.memory.fits

    @property
    def mfu(self) -> float:
        peak = self.hardware.peak_flops(self.work.precision) * self.layout.world
        return model_flops(self.work) / self.step_s / peak

    @property
    def tokens_per_s(self) -> float:
        return self.work.global_batch * self.work.seq_len / self.step_s

    @property
    def microbatches(self) -> int:
        return self.layout.microbatches(self.work.global_batch)

    # the names of the first planner's results
    @property
    def parallel(self):
        return self.layout.parallel()

    @property
    def dp(self) -> int:
        return self.layout.dp

    @property
    def micro_batch(self) -> int:
        return self.layout.micro_batch

    @property
    def zero(self) -> int:
        return self.layout.zero

    @property
    def recompute(self) -> str | None:
        return self.layout.recompute

    @property
    def sequence_parallel(self) -> bool:
        return self.layout.sequence_parallel

    def to_dict(self) -> dict[str, Any]:
        L = self.layout
        return {
            "layout": {
                "gpus": L.world, "tp": L.tp, "pp": L.pp, "vpp": L.vpp, "cp": L.cp, "cp_a2a": L.cp_a2a, "ep": L.ep,
                "etp": L.etp,
                "dp": L.dp, "zero": L.zero, "recompute": L.recompute, "sequence_parallel": L.sequence_parallel,
                "micro_batch": L.micro_batch, "microbatches": self.microbatches, "pipeline_schedule": L.schedule,
            },
            "memory_bytes": {**self.memory.parts, "total": self.memory.total, "usable": self.memory.usable},
            "time_s": {**self.time.parts, "step": self.step_s},
            "hidden_s": self.time.hidden,
            "traffic_bytes": self.time.traffic,
            "pipeline": {"bubble_fraction": self.pipe.bubble_fraction, "in_flight": self.pipe.in_flight,
                         "pending_w": self.pipe.pending_w},
            "fits": self.fits, "mfu": self.mfu, "tokens_per_s": self.tokens_per_s,
        }  # fmt: skip


def estimate(work: Workload, layout: Layout, hw: Hardware) -> Estimate:
    """Memory and time of ``layout`` (which must obey the rules: see :func:`evaluate`)."""
    mbs = layout.microbatches(work.global_batch)
    ratio = 3.0 if layout.recompute == "full" else 2.0
    pipe = pipeline_cost(layout.schedule, layout.pp, layout.vpp, mbs, ratio)
    mem = memory(work, layout, pipe, hw.usable_bytes)
    return Estimate(layout, work, hw, mem, step_time(work, layout, hw, pipe), pipe)


def evaluate(work: Workload, layout: Layout, hw: Hardware) -> Estimate:
    """:func:`estimate` after ``check_run``, which refuses an impossible layout naming the rule."""
    check_run(layout.run_config(work), layout.world)
    return estimate(work, layout, hw)

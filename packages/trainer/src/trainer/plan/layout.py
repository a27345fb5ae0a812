"""A candidate layout and the workload it runs, and the rules of ``check_run`` in a form cheap enough to
apply to thousands of candidates (the search still confirms its answers with ``check_run`` itself)."""

from __future__ import annotations

from dataclasses import dataclass

from pstate import ParallelConfig

from ..config import RunConfig, TrainConfig
from ..model import ModelConfig


@dataclass(frozen=True)
class Workload:
    """What is trained: the model, the sequence length, the global batch (sequences per step), the
    precision, the context-parallel attention and the communication backend."""

    model: ModelConfig
    seq_len: int
    global_batch: int
    precision: str = "bf16"
    cp_attention: str = "ring"
    backend: str = "nccl"  # gloo: ZeRO-1/2 all-reduce their buckets (its reduce-scatter is slower)
    fused_norm: bool = True  # GPUs run RMSNorm fused; on CPU the composite one keeps one more tensor


@dataclass(frozen=True)
class Layout:
    """One way to run a workload on ``world`` GPUs: every flag of ``trainer train`` that matters here."""

    world: int
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1
    zero: int = 0
    recompute: str | None = None
    sequence_parallel: bool = False
    micro_batch: int = 1
    schedule: str = "1f1b"
    cp_a2a: int = 1  # hierarchical CP: the inner all-to-all group's size (a ring of cp / cp_a2a across)

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.cp * self.pp)

    @property
    def edp(self) -> int:
        return self.world // (self.etp * self.ep * self.pp)

    def microbatches(self, global_batch: int) -> int:
        return global_batch // (self.micro_batch * self.dp)

    def parallel(self) -> ParallelConfig:
        return ParallelConfig(
            tp=self.tp, pp=self.pp, vpp=self.vpp, cp=self.cp, ep=self.ep, etp=self.etp, cp_a2a=self.cp_a2a
        )

    def run_config(self, work: Workload) -> RunConfig:
        train = TrainConfig(
            seq_len=work.seq_len, micro_batch=self.micro_batch, global_batch=work.global_batch, zero=self.zero,
            recompute=self.recompute, sequence_parallel=self.sequence_parallel, pipeline_schedule=self.schedule,
            precision=work.precision, cp_attention=work.cp_attention,
        )  # fmt: skip
        return RunConfig(model=work.model, parallel=self.parallel(), train=train)

    @classmethod
    def from_run_config(cls, cfg: RunConfig, world: int) -> Layout:
        p, t = cfg.parallel, cfg.train
        return cls(
            world=world, tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, ep=p.ep, etp=p.etp, zero=t.zero,
            recompute=t.recompute, sequence_parallel=t.sequence_parallel, micro_batch=t.micro_batch,
            schedule=t.pipeline_schedule, cp_a2a=p.cp_a2a,
        )  # fmt: skip


def a2a_size(layout: Layout, work: Workload) -> int:
    """The ranks an all-to-all context-parallel attention splits each TP rank's heads over (1: none)."""
    return {"ulysses": layout.cp, "hierarchical": layout.cp_a2a}.get(work.cp_attention, 1)


def _heads_do_not_split(layout: Layout, work: Workload) -> bool:
    m, a = work.model, a2a_size(layout, work)
    return bool((m.heads // layout.tp) % a or (m.num_kv_heads // layout.tp) % a)


def breaks_a_rule(layout: Layout, work: Workload) -> bool:
    """Whether ``check_run`` would refuse the layout (the cheap rules; schedules by their own rules)."""
    m, L, s = work.model, layout, work.seq_len
    if L.world % (L.tp * L.cp * L.pp) or L.world % (L.etp * L.ep * L.pp):
        return True
    if m.num_kv_heads % L.tp or m.ffn % L.tp or m.layers % (L.pp * L.vpp):
        return True
    if L.sequence_parallel and (L.tp == 1 or s // L.cp % L.tp):
        return True
    if L.cp > 1 and (s % (2 * L.cp) or _heads_do_not_split(layout, work)):
        return True
    if (L.cp_a2a > 1) != (work.cp_attention == "hierarchical" and L.cp > 1) or L.cp % L.cp_a2a:
        return True
    if m.num_experts:
        if m.num_experts % L.ep or m.moe_ffn % L.etp or (L.tp > 1 and not L.sequence_parallel) or L.zero == 3:
            return True
    elif L.ep > 1:
        return True
    if m.position == "learned" and s > m.max_seq_len:
        return True
    if work.global_batch % (L.micro_batch * L.dp):
        return True
    mbs = L.microbatches(work.global_batch)
    if L.pp == 1:
        return False
    if L.schedule == "interleaved-1f1b":
        return L.vpp < 2 or mbs % L.pp != 0  # group_size = pp <= microbatches, a multiple of it
    if L.schedule in ("gpipe", "1f1b", "zero-bubble") and L.vpp != 1:
        return True
    return L.schedule not in ("gpipe", "1f1b", "interleaved-1f1b") and L.zero == 3  # split backward

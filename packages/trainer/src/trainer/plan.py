"""``trainer plan``: which layouts fit a model on a cluster, ranked by an estimated step time.

Estimates, stated so they can be checked and improved (none is measured here):

- **Parameters** from the config (:func:`parameter_count`), exact for our model (tested against it).
- **Memory per GPU**: weights, gradients and AdamW state as this trainer keeps them (fp32 weights that
  are the masters, fp32 gradients, two fp32 moments: 16 bytes per parameter), divided over TP x PP (and
  experts over EP), and the ZeRO stage's share over DP (experts' over EDP); plus activations per Korthikanti et al.
  ("Reducing activation recomputation", 2022): per layer and micro-batch ``s*b*h*(34 + 5*a*s/h)`` bytes
  in 16-bit, ``/tp`` with sequence parallelism, ``34*s*b*h/tp`` with selective recomputation, ``2*s*b*h``
  with full recomputation; ``s`` is the sequence over CP; the first pipeline stage holds ``pp`` micro-
  batches of its layers (1F1B); plus the logits of the last stage. A 10% margin is left free.
- **Step time** (within 10 ms, the simpler layout first): model FLOPs over
  ``world * peak * efficiency``, stretched by the pipeline bubble ``(pp-1)/(m+pp-1)``; plus the TP
  collectives (four per layer and micro-batch, of ``s*b*h`` 16-bit values, at intra-node bandwidth);
  the ring attention's K/V blocks over CP (forward, and K/V plus their gradients in backward); and the
  part of the DP traffic that backward cannot hide (gradient reduction, and the ZeRO parameter
  all-gathers: once per step for ZeRO-1/2, twice per micro-batch for ZeRO-3). Recomputation adds a
  forward (full) or the attention scores again (selective).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from pstate import ParallelConfig

from .config import RunConfig, TrainConfig, check_run
from .errors import TrainerError
from .model import ModelConfig
from .train.flops import flops_per_token


@dataclass(frozen=True)
class Cluster:
    """GPUs, memory and links; defaults describe an 8 x H100 80GB node with NVLink and 400 Gb/s NICs."""

    gpus: int
    gpus_per_node: int = 8
    memory_gib: float = 80.0
    peak_tflops: float = 989.0
    efficiency: float = 0.5
    intra_node_gbps: float = 450.0
    inter_node_gbps: float = 50.0


@dataclass(frozen=True)
class Plan:
    parallel: ParallelConfig
    dp: int
    zero: int
    recompute: str | None
    sequence_parallel: bool
    micro_batch: int
    microbatches: int
    memory_gib: float
    step_s: float
    mfu: float

    def command(self, model: str, seq_len: int, global_batch: int) -> str:
        p = self.parallel
        flags = [f"--model {model}", f"--seq-len {seq_len}", f"--global-batch {global_batch}",
                 f"--micro-batch {self.micro_batch}", f"--tp {p.tp}", f"--pp {p.pp}", f"--cp {p.cp}",
                 f"--ep {p.ep}", f"--zero {self.zero}"]  # fmt: skip
        if self.sequence_parallel:
            flags.append("--sequence-parallel")
        if self.recompute:
            flags.append(f"--recompute {self.recompute}")
        return "trainer train " + " ".join(flags)


def parameter_count(cfg: ModelConfig) -> tuple[int, int]:
    """``(dense, expert)`` parameter counts of the model (without vocabulary padding)."""
    h, d, v = cfg.hidden, cfg.head_dim, cfg.vocab_size or 0
    q, kv = cfg.heads * d, cfg.num_kv_heads * d
    norm = h * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    attention = h * (q + 2 * kv) + q * h + ((q + 2 * kv) + h if cfg.bias else 0)
    matrices = 3 if cfg.mlp == "swiglu" else 2
    mlp = matrices * h * cfg.ffn + ((matrices - 1) * cfg.ffn + h if cfg.bias else 0)
    dense = v * h * (1 if cfg.tied_embeddings else 2) + (cfg.max_seq_len * h if cfg.position == "learned" else 0) + norm
    expert = 0
    for layer in range(cfg.layers):
        dense += attention + 2 * norm
        if cfg.is_moe_layer(layer):
            dense += h * cfg.num_experts
            expert += cfg.num_experts * matrices * h * cfg.moe_ffn
        else:
            dense += mlp
    return dense, expert


def estimate(cfg: RunConfig, cluster: Cluster) -> Plan:
    """Memory and step time of one configuration (already checked by :func:`check_run`)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    world = cluster.gpus
    dp = world // (p.tp * p.pp * p.cp)
    microbatches = (t.global_batch or t.micro_batch * dp) // (t.micro_batch * dp)
    dense, expert = parameter_count(m)
    local = dense / (p.tp * p.pp) + expert / (p.etp * p.ep * p.pp)
    edp = world // (p.etp * p.ep * p.pp)  # ZeRO shards the experts' state over their data-parallel group

    def shard(n: int) -> float:  # bytes per parameter a rank keeps, its ZeRO stage sharding over n ranks
        return {0: 16.0, 1: 8 + 8 / n, 2: 4 + 12 / n, 3: 16 / n}[t.zero]

    states = dense / (p.tp * p.pp) * shard(dp) + expert / (p.etp * p.ep * p.pp) * shard(edp)
    s, b, h, a = t.seq_len // p.cp, t.micro_batch, m.hidden, m.heads
    if t.recompute == "full":
        per_layer = 2 * s * b * h
    elif t.recompute == "selective":
        per_layer = 34 * s * b * h / (p.tp if t.sequence_parallel else 1)
    else:
        per_layer = s * b * h * (34 + 5 * a * s / h) / (p.tp if t.sequence_parallel else 1)
    in_flight = min(p.pp, microbatches)
    activations = per_layer * (m.layers / p.pp) * in_flight + 4 * s * b * (m.vocab_size or 0) / p.tp
    memory = (states + activations) / 2**30
    tokens = microbatches * b * t.seq_len * dp
    compute = flops_per_token(m, t.seq_len) * tokens / (world * cluster.peak_tflops * 1e12 * cluster.efficiency)
    if t.recompute == "full":  # one more forward of every layer
        compute *= 4 / 3
    elif t.recompute == "selective":  # one more pass of the attention scores
        compute *= 1 + 4 * t.seq_len * m.heads * m.head_dim * m.layers / flops_per_token(m, t.seq_len)
    bubble = (p.pp - 1) / (microbatches + p.pp - 1)
    tp_bytes = 4 * 2 * s * b * h * (m.layers / p.pp) * microbatches * 3  # forward and backward
    tp_link = cluster.intra_node_gbps if p.tp <= cluster.gpus_per_node else cluster.inter_node_gbps
    tp_time = 0.0 if p.tp == 1 else tp_bytes * (p.tp - 1) / p.tp / (tp_link * 1e9)
    dp_link = cluster.inter_node_gbps if world > cluster.gpus_per_node else cluster.intra_node_gbps
    gathers = {0: 0, 1: 1, 2: 1, 3: 2 * microbatches}[t.zero]  # parameter all-gathers per step
    dp_time = 0.0 if dp == 1 else (2 + gathers) * 4 * local * (dp - 1) / dp / (dp_link * 1e9)
    kv = 2 * s * b * m.num_kv_heads * m.head_dim * 2  # a K and V block in 16-bit
    cp_link = cluster.intra_node_gbps if p.tp * p.cp <= cluster.gpus_per_node else cluster.inter_node_gbps
    cp_time = 0.0 if p.cp == 1 else 3 * kv * (p.cp - 1) * (m.layers / p.pp) * microbatches / (cp_link * 1e9)
    step = compute / (1 - bubble) + tp_time + cp_time + max(0.0, dp_time - 0.5 * compute)
    mfu = flops_per_token(m, t.seq_len) * tokens / step / (world * cluster.peak_tflops * 1e12)
    return Plan(p, dp, t.zero, t.recompute, t.sequence_parallel, b, microbatches, memory, step, mfu)


def plan(
    model: ModelConfig, cluster: Cluster, *, seq_len: int, global_batch: int, micro_batches=(1, 2, 4), top: int = 5
) -> list[Plan]:
    """The ``top`` layouts that fit in memory, fastest first (by the estimate)."""
    if model.vocab_size is None:
        raise TrainerError("plan: the model needs a vocab_size (a preset with one, or set model.vocab_size)")
    world = cluster.gpus
    sizes = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= world]
    found = []
    for tp, pp, cp, ep, zero, recompute, mb in itertools.product(
        [n for n in sizes if n <= cluster.gpus_per_node],
        sizes,
        sizes,
        sizes,
        (0, 1, 2, 3),
        (None, "selective", "full"),
        micro_batches,
    ):
        if world % (tp * pp * cp) or (ep > 1 and not model.num_experts):
            continue
        train = TrainConfig(
            seq_len=seq_len, micro_batch=mb, global_batch=global_batch, zero=zero, recompute=recompute,
            sequence_parallel=tp > 1, pipeline_schedule="1f1b",
        )  # fmt: skip
        cfg = RunConfig(model=model, parallel=ParallelConfig(tp=tp, pp=pp, cp=cp, ep=ep), train=train)
        try:
            check_run(cfg, world)
        except TrainerError:
            continue
        estimate_ = estimate(cfg, cluster)
        if estimate_.memory_gib <= 0.9 * cluster.memory_gib:
            found.append(estimate_)
    found.sort(key=lambda e: (round(e.step_s, 2), e.parallel.tp * e.parallel.pp * e.parallel.cp, e.memory_gib))
    return found[:top]


WIDTHS = (3, 3, 3, 3, 4, 4, 10, 3, 8, 8, 6)


def render(plans: list[Plan], model_name: str, seq_len: int, global_batch: int) -> str:
    if not plans:
        return "no layout fits: add GPUs or memory, or shorten the sequence"
    head = ("tp", "pp", "cp", "ep", "dp", "zero", "recompute", "mb", "GiB/GPU", "step s", "MFU")
    lines = [" ".join(f"{h:>{w}}" for h, w in zip(head, WIDTHS))]
    for e in plans:
        p = e.parallel
        row = (p.tp, p.pp, p.cp, p.ep, e.dp, e.zero, e.recompute or "-", e.micro_batch,
               f"{e.memory_gib:.1f}", f"{e.step_s:.2f}", f"{100 * e.mfu:.1f}%")  # fmt: skip
        lines.append(" ".join(f"{v:>{w}}" for v, w in zip(row, WIDTHS)))
    lines.append("")
    lines.append("best: " + plans[0].command(model_name, seq_len, global_batch))
    return "\n".join(lines)

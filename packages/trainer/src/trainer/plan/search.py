"""The search: every layout that obeys the rules, pruned by memory before it is timed, fastest first.

Enumerated: TP (powers of two within a node, dividing the KV heads and FFN), CP (powers of two up to
16), PP (divisors of the layer count), the schedule (1F1B, interleaved 1F1B with 2 or 4 chunks,
zero-bubble, and the other schedules ``pp_sched`` builds, such as the V shapes), EP (divisors of the
expert count), the micro-batch size (1, 2, 4, 8), the ZeRO stage and recomputation; sequence
parallelism whenever TP > 1. Memory only falls from ZeRO 0 to 3 and from no recomputation to full,
and time only rises, so for each structure the first stage / recomputation that fits is kept and a
micro-batch size that cannot fit at the most economical setting ends the larger ones. Each answer is
confirmed by ``check_run``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pp_sched import SCHEDULES, PipelineScheduleError

from ..config import check_run
from ..errors import TrainerError
from .estimate import Estimate, estimate
from .hardware import Hardware
from .layout import Layout, Workload, breaks_a_rule

RECOMPUTE = (None, "selective", "full")
MICRO_BATCHES = (1, 2, 4, 8)


def _powers(limit: int) -> list[int]:
    return [1 << i for i in range(limit.bit_length()) if 1 << i <= limit]


def _structures(work: Workload, world: int, hw: Hardware, fixed: dict[str, Any]) -> Iterator[dict[str, Any]]:
    m = work.model

    def choices(name: str, default: list[Any]) -> list[Any]:
        return [fixed[name]] if name in fixed else default

    for tp in choices("tp", [t for t in _powers(hw.gpus_per_node) if not m.num_kv_heads % t and not m.ffn % t]):
        for cp in choices("cp", [c for c in _powers(16) if c == 1 or not work.seq_len % (2 * c)]):
            for pp in choices("pp", [p for p in range(1, m.layers + 1) if not m.layers % p]):
                if world % (tp * cp * pp):
                    continue
                for ep in choices("ep", [e for e in range(1, m.num_experts + 1) if not m.num_experts % e] or [1]):
                    etp = fixed.get("etp", tp)
                    if world % (etp * ep * pp):
                        continue
                    for schedule, vpp in _schedules(pp, m.layers, fixed):
                        sp = fixed.get("sequence_parallel", tp > 1)
                        for a2a in _a2a_sizes(work, tp, cp, fixed):
                            yield dict(tp=tp, cp=cp, pp=pp, ep=ep, etp=etp, schedule=schedule, vpp=vpp,
                                       sequence_parallel=sp, cp_a2a=a2a)  # fmt: skip


def _a2a_sizes(work: Workload, tp: int, cp: int, fixed: dict[str, Any]) -> list[int]:
    """Hierarchical CP's inner all-to-all sizes worth trying: divisors of ``cp`` above 1 that split each TP
    rank's heads (the fixed one, if given); ``[1]`` for the other attentions and without CP."""
    if work.cp_attention != "hierarchical" or cp == 1:
        return [1]
    if "cp_a2a" in fixed:
        return [fixed["cp_a2a"]]
    heads, kv_heads = work.model.heads // tp, work.model.num_kv_heads // tp
    return [a for a in _powers(cp) if a > 1 and not cp % a and not heads % a and not kv_heads % a]


def _schedules(pp: int, layers: int, fixed: dict[str, Any]) -> list[tuple[str, int]]:
    """``(schedule, vpp)`` pairs: GPipe is left out (1F1B has its bubble with less memory); schedules
    ``pp_sched`` gains later (V shapes) are tried with 1 and 2 chunks and kept where they build."""
    if pp == 1:
        options = [("1f1b", 1)]
    else:
        options = [("1f1b", 1), ("zero-bubble", 1)]
        options += [("interleaved-1f1b", v) for v in (2, 4) if not layers % (pp * v)]
        known = {"gpipe", "1f1b", "zero-bubble", "interleaved-1f1b"}
        options += [(name, v) for name in SCHEDULES if name not in known for v in (1, 2) if not layers % (pp * v)]
    if "schedule" in fixed:
        options = [(s, v) for s, v in options if s == fixed["schedule"]] or [(fixed["schedule"], 1)]
    if "vpp" in fixed:
        options = [(s, fixed["vpp"]) for s, _ in options if (fixed["vpp"] > 1) == (s == "interleaved-1f1b")]
    return list(dict.fromkeys(options))


def search(
    work: Workload, world: int, hw: Hardware, *, top: int = 5, fixed: dict[str, Any] | None = None
) -> list[Estimate]:
    """The ``top`` fastest layouts that fit (one per structure and micro-batch size), each confirmed by
    ``check_run``. ``fixed`` pins any :class:`Layout` field (the flags given with ``--top``)."""
    fixed = fixed or {}
    zeros = [fixed["zero"]] if "zero" in fixed else [0, 1, 2, 3]
    recomputes = [fixed["recompute"]] if "recompute" in fixed else list(RECOMPUTE)
    micro = [fixed["micro_batch"]] if "micro_batch" in fixed else list(MICRO_BATCHES)
    found: list[Estimate] = []
    for structure in _structures(work, world, hw, fixed):
        for mb in micro:
            fitted = tried = False
            for zero in zeros:
                for recompute in recomputes:
                    layout = Layout(world=world, micro_batch=mb, zero=zero, recompute=recompute, **structure)
                    if breaks_a_rule(layout, work):
                        continue
                    tried = True
                    try:
                        result = estimate(work, layout, hw)
                    except PipelineScheduleError:  # a schedule whose own rules refuse this shape
                        continue
                    if result.fits:
                        found.append(result)
                        fitted = True
                        break
                if fitted:
                    break
            if tried and not fitted:
                break  # a larger micro-batch needs more memory still
    found.sort(key=_rank)
    confirmed = []
    for result in found:
        try:
            check_run(result.layout.run_config(work), world)
        except TrainerError:
            continue
        confirmed.append(result)
        if len(confirmed) == top:
            break
    return confirmed


def _rank(e: Estimate) -> tuple:
    """Fastest first; within a millisecond the simpler layout (less model parallelism, lower ZeRO stage)."""
    L = e.layout
    return (round(e.step_s, 3), L.tp * L.pp * L.cp * L.ep, L.zero, e.memory.total)


def smallest_cluster(
    work: Workload, hw: Hardware, *, start: int = 1, limit: int = 1 << 20
) -> tuple[int, Estimate] | None:
    """The fewest GPUs (powers of two from ``start``) on which some layout holds the model, with one such
    layout; the global batch grows to the GPU count where it must."""
    world = 1 << max(0, start - 1).bit_length()
    while world <= limit:
        batch = max(work.global_batch, world)
        trial = Workload(work.model, work.seq_len, batch, work.precision, work.cp_attention)
        fits = search(trial, world, hw, top=1)
        if fits:
            return world, fits[0]
        world *= 2
    return None

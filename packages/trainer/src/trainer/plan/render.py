"""Text and JSON for ``trainer plan``: the ranked table, the winner's breakdowns, why it wins, and the
``trainer train`` command that runs it."""

from __future__ import annotations

import json
from typing import Any

from ..model import ModelConfig
from .estimate import Estimate
from .memory import GIB
from .models import model_flags

HEAD = ("#", "tp", "pp", "vpp", "cp", "ep", "dp", "zero", "recompute", "mb", "schedule", "GiB/GPU", "step s",
        "MFU", "bubble")  # fmt: skip


def command(e: Estimate, model_name: str, model: ModelConfig) -> str:
    """The ``trainer train`` command line of this layout."""
    L, w = e.layout, e.work
    flags = [*model_flags(model, model_name), f"--seq-len {w.seq_len}", f"--global-batch {w.global_batch}",
             f"--micro-batch {L.micro_batch}", f"--tp {L.tp}", f"--pp {L.pp}"]  # fmt: skip
    if L.vpp > 1:
        flags.append(f"--vpp {L.vpp}")
    flags += [f"--cp {L.cp}", f"--ep {L.ep}"]
    if L.etp != L.tp:
        flags.append(f"--etp {L.etp}")
    flags.append(f"--zero {L.zero}")
    if L.sequence_parallel:
        flags.append("--sequence-parallel")
    if L.recompute:
        flags.append(f"--recompute {L.recompute}")
    if L.pp > 1:
        flags.append(f"--pipeline-schedule {L.schedule}")
    flags.append(f"--precision {w.precision}")
    if w.cp_attention != "ring" and L.cp > 1:
        flags.append(f"--set train.cp_attention={json.dumps(w.cp_attention)}")
    if L.cp_a2a > 1:
        flags.append(f"--set parallel.cp_a2a={L.cp_a2a}")
    if L.world <= e.hardware.gpus_per_node:
        flags.append(f"--nproc {L.world}")
    return "trainer train " + " ".join(flags)


def _row(i: int | str, e: Estimate) -> list[str]:
    L = e.layout
    cp = f"{L.cp_a2a}x{L.cp // L.cp_a2a}" if L.cp_a2a > 1 else L.cp  # hierarchical: all-to-all x ring
    return [str(v) for v in (i, L.tp, L.pp, L.vpp, cp, L.ep, L.dp, L.zero, L.recompute or "-", L.micro_batch,
            L.schedule if L.pp > 1 else "-", f"{e.memory_gib:.1f}", f"{e.step_s:.3f}", f"{100 * e.mfu:.1f}%",
            f"{100 * e.pipe.bubble_fraction:.0f}%")]  # fmt: skip


def table(estimates: list[Estimate]) -> str:
    rows = [list(HEAD)] + [_row(i + 1, e) for i, e in enumerate(estimates)]
    widths = [max(len(r[c]) for r in rows) for c in range(len(HEAD))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows)


def breakdown(e: Estimate) -> str:
    """The memory and time of one layout, part by part."""
    lines = [f"memory per GPU (fullest pipeline stage), {e.hardware.name}:"]
    for name, value in e.memory.parts.items():
        if value:
            lines.append(f"  {name:<24}{value / GIB:>9.2f} GiB")
    lines.append(f"  {'total':<24}{e.memory.total / GIB:>9.2f} GiB of {e.memory.usable / GIB:.1f} usable "
                 f"({e.hardware.memory_gib:g} GiB less {e.hardware.framework_gib:g} GiB framework and "
                 f"{100 * e.hardware.fragmentation:g}% fragmentation)")  # fmt: skip
    lines.append(f"time per step ({e.microbatches} micro-batches of {e.layout.micro_batch}):")
    for name, value in e.time.parts.items():
        if value:
            lines.append(f"  {name:<24}{value:>9.4f} s  {100 * value / e.step_s:5.1f}%")
    lines.append(f"  {'step':<24}{e.step_s:>9.4f} s  MFU {100 * e.mfu:.1f}%  {e.tokens_per_s:,.0f} tokens/s")
    hidden = {k: v for k, v in e.time.hidden.items() if v > 0}
    if hidden:
        lines.append("  hidden under compute: " + ", ".join(f"{k} {v:.4f} s" for k, v in hidden.items()))
    return "\n".join(lines)


def why(best: Estimate, other: Estimate) -> str:
    """The parts in which ``best`` gains most over ``other``."""
    gaps = {k: other.time.parts.get(k, 0.0) - best.time.parts.get(k, 0.0) for k in best.time.parts}
    gains = sorted(((v, k) for k, v in gaps.items() if v > 0), reverse=True)[:3]
    total = other.step_s - best.step_s
    if total < 5e-4 or not gains:
        return (
            f"#1 and #2 tie within a millisecond ({best.step_s:.4f} s vs {other.step_s:.4f} s): #1 is the "
            "simpler layout (less model parallelism, a lower ZeRO stage, or less memory)"
        )
    said = ", ".join(f"{k} {v:.4f} s" for v, k in gains)
    return f"why #1 wins over #2: {total:.4f} s faster per step ({100 * total / other.step_s:.1f}%); less {said}"


def render(estimates: list[Estimate], model_name: str, model: ModelConfig) -> str:
    lines = [table(estimates), "", breakdown(estimates[0])]
    if len(estimates) > 1:
        lines.append(why(estimates[0], estimates[1]))
    lines += ["", "best: " + command(estimates[0], model_name, model)]
    return "\n".join(lines)


def render_json(estimates: list[Estimate], model_name: str, model: ModelConfig, extra: dict[str, Any]) -> str:
    items = [{**e.to_dict(), "command": command(e, model_name, model)} for e in estimates]
    return json.dumps({**extra, "layouts": items}, indent=2)

"""Draw a schedule: a text Gantt chart for the terminal, and an image (SVG, PNG, PDF) with matplotlib."""

from __future__ import annotations

import math
from fractions import Fraction
from numbers import Real
from pathlib import Path

from .action import Schedule
from .simulate import Simulation, simulate

_MAX_COLUMNS = 2000
_MAX_SPAN = 4
_COLOURS = {"F": "#4c72b0", "B": "#55a868", "I": "#dd8452", "W": "#8172b3"}
_NAMES = {"F": "forward", "B": "backward", "I": "input gradient", "W": "weight gradient"}


def _simulation(what: Schedule | Simulation, forward: Real, backward: Real, weight: Real | None, comm: Real):
    return what if isinstance(what, Simulation) else simulate(what, forward, backward, weight, comm=comm)


def _exact(x: Real) -> Fraction:
    return Fraction(x).limit_denominator(10**6)


def _column_time(sim: Simulation) -> Fraction:
    """The largest time step that every start and end falls on. Where that would give the shortest action
    more than ``_MAX_SPAN`` columns, or the chart more than ``_MAX_COLUMNS``, the shortest action's duration
    instead (times are then rounded to a column)."""
    step = Fraction(0)
    for line in sim.timelines:
        for slot in line:
            for t in (_exact(slot.start), _exact(slot.end)):
                step = Fraction(
                    math.gcd(step.numerator * t.denominator, t.numerator * step.denominator),
                    step.denominator * t.denominator,
                )
    makespan = _exact(sim.makespan)
    shortest = min(_exact(slot.end - slot.start) for line in sim.timelines for slot in line)
    if shortest / step > _MAX_SPAN or makespan / step > _MAX_COLUMNS:
        step = max(shortest, makespan / _MAX_COLUMNS)
    return step


def render(
    what: Schedule | Simulation,
    *,
    forward: Real = 1.0,
    backward: Real = 2.0,
    weight: Real | None = None,
    comm: Real = 0,
) -> str:
    """A text Gantt chart: one row per rank, one column per time step, each action labelled ``F3``
    (``F3c1`` on chunk 1) and continued with ``-`` for as long as it runs; ``.`` is idle time.

    ``what`` is a schedule (simulated with the given costs, see :func:`pp_sched.simulate`) or a simulation.
    """
    sim = _simulation(what, forward, backward, weight, comm)
    step = _column_time(sim)
    columns = math.ceil(_exact(sim.makespan) / step)
    width = max(3, 1 + max(len(slot.action.label) for line in sim.timelines for slot in line))
    prefix = max(len(f"rank {sim.schedule.pp - 1}"), len("time")) + 1

    def column(t: Real) -> int:
        return round(_exact(t) / step)

    rows = []
    pairs = sim.schedule.pairs
    for rank, line in enumerate(sim.timelines):
        cells = [".".ljust(width)] * columns
        paired = {k + i for k in pairs[rank] for i in (0, 1)}
        for index, slot in enumerate(line):
            first, last = column(slot.start), max(column(slot.end), column(slot.start) + 1)
            span = (last - first) * width
            label = slot.action.label[: span - 1]
            fill = "=" if index in paired else "-"
            text = (label + fill * (span - len(label) - 1) + " ") if span > len(label) + 1 else label.ljust(span)
            for k in range(first, min(last, columns)):
                cells[k] = text[(k - first) * width : (k - first + 1) * width]
        rows.append(f"rank {rank}".ljust(prefix) + "".join(cells).rstrip())
    tick = [f"{float(k * step):.4g}" for k in range(columns + 1)]
    every = max(1, math.ceil((max(map(len, tick)) + 1) / width))
    ticks = ""
    for k in range(0, columns + 1, every):
        ticks = ticks.ljust(k * width) + tick[k]
    kinds = sorted({slot.action.kind for line in sim.timelines for slot in line}, key="FBIW".index)
    legend = ", ".join(f"{k} {_NAMES[k]}" for k in kinds)
    chunks = "; cN = chunk N" if sim.schedule.vpp > 1 else ""
    if any(pairs):
        chunks += "; == an overlapped pair (a forward and a backward of another microbatch)"
    exact = step * columns == _exact(sim.makespan) and all(
        (_exact(slot.start) / step).denominator == 1 for line in sim.timelines for slot in line
    )
    rounded = "" if exact else ", times rounded"
    footer = f"{legend}{chunks}; . idle; one column = {float(step):.4g} time units{rounded}"
    s = sim.schedule
    title = f"{s.name}: pp={s.pp} vpp={s.vpp} microbatches={s.microbatches}"
    return "\n".join([title, "time".ljust(prefix) + ticks, *rows, footer])


def render_image(
    what: Schedule | Simulation,
    path: str | Path,
    *,
    forward: Real = 1.0,
    backward: Real = 2.0,
    weight: Real | None = None,
    comm: Real = 0,
) -> Path:
    """Draw the Gantt chart into ``path``; the suffix picks the format (``.svg``, ``.png``, ``.pdf``).

    Needs matplotlib (``pip install 'pp-sched[plot]'``), which is imported only here.
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as err:
        raise ImportError("render_image needs matplotlib: pip install 'pp-sched[plot]'") from err
    sim = _simulation(what, forward, backward, weight, comm)
    s = sim.schedule
    span = float(sim.makespan)
    fig = Figure(figsize=(min(40.0, max(6.0, 0.35 * span + 1.5)), 0.55 * s.pp + 1.4))
    ax = fig.add_subplot()
    for rank, line in enumerate(sim.timelines):
        for slot in line:
            a = slot.action
            shade = 1.0 - 0.5 * a.chunk / max(1, s.vpp - 1)
            ax.barh(
                rank,
                float(slot.end - slot.start),
                left=float(slot.start),
                height=0.8,
                color=_COLOURS[a.kind],
                alpha=shade,
                edgecolor="white",
                linewidth=0.6,
            )
            label = a.label if s.vpp == 1 else str(a.microbatch)
            colour = "white" if shade > 0.75 else "black"
            ax.text(float(slot.start + slot.end) / 2, rank, label, ha="center", va="center", fontsize=7, color=colour)
    kinds = sorted({slot.action.kind for line in sim.timelines for slot in line}, key="FBIW".index)
    ax.legend(
        handles=[Patch(color=_COLOURS[k], label=_NAMES[k]) for k in kinds],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.25 if s.pp > 1 else -0.5),
        ncol=len(kinds),
        frameon=False,
        fontsize=8,
    )
    ax.set_yticks(range(s.pp), [f"rank {r}" for r in range(s.pp)])
    ax.set_ylim(s.pp - 0.5, -0.5)
    ax.set_xlim(0, span)
    ax.set_xlabel("time")
    chunks = " (lighter: later chunks)" if s.vpp > 1 else ""
    ax.set_title(
        f"{s.name}: pp={s.pp}, vpp={s.vpp}, microbatches={s.microbatches}, bubble {sim.bubble_fraction:.1%}{chunks}",
        fontsize=10,
    )
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    return out

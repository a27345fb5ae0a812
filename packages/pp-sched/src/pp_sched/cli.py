"""``pp-sched show``: print a schedule's Gantt chart, bubble fraction and peak activations; draw an image."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import PipelineScheduleError
from .render import render, render_image
from .schedules import SCHEDULES, build
from .simulate import simulate


def _number(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() else value


def parser() -> argparse.ArgumentParser:
    """The argument parser of the ``pp-sched`` command."""
    top = argparse.ArgumentParser(prog="pp-sched", description="Pipeline schedules as data.")
    commands = top.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", help="print a schedule's chart, bubble fraction and peak activations")
    show.add_argument("--schedule", required=True, choices=SCHEDULES)
    show.add_argument("--pp", type=int, required=True, help="pipeline ranks")
    show.add_argument("--microbatches", type=int, required=True)
    show.add_argument("--vpp", type=int, help="model chunks per rank (interleaved-1f1b; 2 for zb-v, dualpipe-v)")
    show.add_argument("--group-size", type=int, help="interleaved microbatch group size (default: pp)")
    show.add_argument("--forward", type=_number, default=1, help="time of one forward (default 1)")
    show.add_argument("--backward", type=_number, default=2, help="time of one backward (default 2)")
    show.add_argument("--weight", type=_number, help="time of the weight-gradient part (default backward/2)")
    show.add_argument("--comm", type=_number, default=0, help="time of one send between ranks (default 0)")
    show.add_argument("--out", help="also draw the chart into this .svg/.png/.pdf file (needs matplotlib)")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for a refused schedule)."""
    args = parser().parse_args(argv)
    try:
        schedule = build(
            args.schedule, pp=args.pp, microbatches=args.microbatches, vpp=args.vpp, group_size=args.group_size
        )
        sim = simulate(schedule, args.forward, args.backward, args.weight, comm=args.comm)
        print(render(sim))
        print(f"makespan: {sim.makespan:g}")
        print(f"bubble fraction: {sim.bubble_fraction:.4f} ({sim.bubble_fraction:.1%})")
        peaks = ", ".join(f"rank {r}: {p}" for r, p in enumerate(sim.peak_activations))
        print(f"peak activations (microbatch-chunks held): {peaks}")
        if args.out:
            print(f"wrote {render_image(sim, args.out)}")
    except (PipelineScheduleError, ImportError) as err:
        print(f"pp-sched: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

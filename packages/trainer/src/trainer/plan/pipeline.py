"""What the pipeline schedule costs, from ``pp_sched``'s simulator: bubble and in-flight activations.

The simulator runs the schedule's real action lists on a model of time (forward 1, backward ``ratio``,
no p2p time). Results are cached by shape. From ``CAP_ROUNDS`` rounds of ``pp`` micro-batches on, the
idle time per rank and the activations held no longer grow with the micro-batch count (every rank is in
its steady state), so a longer schedule is simulated at that length and its steady part added; a test
checks this against the full simulation. The V schedules (ZB-V, DualPipe-V) are simulated up to four
rounds and taken from there: their activations held are steady, but ZB-V's idle time keeps varying with
the micro-batch count (between 0.5 and 0.83 micro-batches at ``pp=4``), so beyond four rounds it is
known within half a micro-batch's time.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from pp_sched import build, simulate

CAP_ROUNDS = 2
STEADY = ("gpipe", "1f1b", "interleaved-1f1b", "zero-bubble")  # steady after CAP_ROUNDS (tested)


@dataclass(frozen=True)
class PipelineCost:
    """Per step: ``idle`` is the mean idle time per rank in units of one micro-batch's forward and backward
    on a rank; ``in_flight`` the most activation sets the worst rank holds (each one chunk's layers;
    ``in_flight_last`` the last rank's);
    ``pending_w`` the most sets waiting only for their weight gradient (split-backward schedules)."""

    idle: float
    in_flight: int
    pending_w: int
    bubble_fraction: float
    in_flight_last: int = 1  # the last rank's, which also holds the logits


def pipeline_cost(schedule: str, pp: int, vpp: int, microbatches: int, ratio: float = 2.0) -> PipelineCost:
    """The cost of ``schedule`` with ``microbatches``; ``ratio`` is the backward's time over the forward's."""
    if pp == 1:
        return PipelineCost(0.0, 1, 0, 0.0, 1)
    cap = (CAP_ROUNDS if schedule in STEADY else 2 * CAP_ROUNDS) * pp
    if microbatches <= cap:
        return _simulated(schedule, pp, vpp, microbatches, ratio)
    short = _simulated(schedule, pp, vpp, cap, ratio)
    busy = microbatches  # in micro-batch units per rank
    in_flight = microbatches * vpp if short.in_flight >= cap * vpp else short.in_flight  # GPipe holds them all
    last = microbatches * vpp if short.in_flight_last >= cap * vpp else short.in_flight_last
    return PipelineCost(short.idle, in_flight, short.pending_w, short.idle / (short.idle + busy), last)


@lru_cache(maxsize=4096)
def _simulated(schedule: str, pp: int, vpp: int, microbatches: int, ratio: float) -> PipelineCost:
    sim = simulate(build(schedule, pp=pp, microbatches=microbatches, vpp=vpp), 1.0, ratio)
    idle = sim.bubble_fraction * sim.makespan / (1.0 + ratio)
    pending = max(sim.peak_pending_w) if sim.peak_pending_w else 0
    return PipelineCost(idle, max(sim.peak_activations), pending, sim.bubble_fraction, sim.peak_activations[-1])

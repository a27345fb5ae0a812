"""``simulate``: timelines obey the dependencies, and bubble and memory match the closed forms.

Costs are exact fractions so the closed forms are compared with ``==``, not a tolerance.
"""

import itertools
from fractions import Fraction

import pytest

from pp_sched import Action, PipelineScheduleError, build, simulate

ONE, TWO = Fraction(1), Fraction(2)
PPS = range(1, 9)
MICROBATCHES = (1, 2, 3, 4, 5, 7, 8, 12, 16, 17, 32)


def check_dependencies(sim, comm=0):
    """Independently of the simulator: no overlap on a rank, every input arrived before an action starts."""
    s = sim.schedule
    end = {}
    for rank, line in enumerate(sim.timelines):
        assert [slot.action for slot in line] == list(s.actions[rank])
        for before, after in itertools.pairwise(line):
            assert before.end <= after.start
        for slot in line:
            kind = "G" if slot.action.kind in "BI" else slot.action.kind
            end[(kind, slot.action.microbatch, s.stage_of(rank, slot.action.chunk))] = (slot.end, rank)
    last = s.num_stages - 1
    for rank, line in enumerate(sim.timelines):
        for slot in line:
            a, stage = slot.action, s.stage_of(rank, slot.action.chunk)
            needs = {"F": [("F", stage - 1)] if stage else [], "W": [("G", stage)]}.get(
                a.kind, [("F", stage)] + ([("G", stage + 1)] if stage < last else [])
            )
            for kind, other in needs:
                t, producer = end[(kind, a.microbatch, other)]
                assert slot.start >= t + (comm if producer != rank else 0)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("pp", PPS)
@pytest.mark.parametrize("m", MICROBATCHES)
def test_gpipe_and_1f1b_bubble_is_the_closed_form(name, pp, m):
    sim = simulate(build(name, pp=pp, microbatches=m), ONE, TWO)
    # (m + pp - 1) slots of f + b on the critical path, m of them busy on every rank
    assert sim.makespan == (m + pp - 1) * 3
    assert sim.bubble_fraction == Fraction(pp - 1, m + pp - 1)
    assert sim.idle_fractions == (sim.bubble_fraction,) * pp
    check_dependencies(sim)


@pytest.mark.parametrize("pp", PPS)
@pytest.mark.parametrize("m", MICROBATCHES)
def test_peak_activations_1f1b_is_pp_minus_rank_and_gpipe_holds_all(pp, m):
    one_f_one_b = simulate(build("1f1b", pp=pp, microbatches=m))
    assert one_f_one_b.peak_activations == tuple(min(pp - rank, m) for rank in range(pp))
    assert simulate(build("gpipe", pp=pp, microbatches=m)).peak_activations == (m,) * pp


def interleaved_grid():
    for pp in range(2, 7):
        for vpp in (2, 3, 4):
            for m in range(pp, 4 * pp + 1):
                for group in sorted({pp, m, pp + 1}):
                    remainder = m % group
                    if pp <= group <= m and not 0 < remainder < pp:
                        yield pp, vpp, m, group


@pytest.mark.parametrize(("pp", "vpp", "m", "group"), list(interleaved_grid()))
def test_interleaved_bubble_is_1f1b_bubble_divided_by_vpp(pp, vpp, m, group):
    sim = simulate(build("interleaved-1f1b", pp=pp, microbatches=m, vpp=vpp, group_size=group), ONE, TWO)
    # bubble time (pp - 1)(f + b) / vpp next to m(f + b) of work per rank
    assert sim.bubble_fraction == Fraction(pp - 1, vpp * m + pp - 1)
    assert sim.bubble_fraction < simulate(build("1f1b", pp=pp, microbatches=m), ONE, TWO).bubble_fraction
    total = m * vpp
    assert sim.peak_activations == tuple(min(2 * (pp - rank - 1) + (vpp - 1) * group + 1, total) for rank in range(pp))
    check_dependencies(sim)


@pytest.mark.parametrize("pp", PPS)
@pytest.mark.parametrize("m", MICROBATCHES)
def test_zero_bubble_is_zb_h1_with_1f1b_activation_memory(pp, m):
    zb = simulate(build("zero-bubble", pp=pp, microbatches=m), ONE, TWO)
    base = simulate(build("1f1b", pp=pp, microbatches=m), ONE, TWO)
    if m >= pp:  # ZB-H1 (Qi et al. 2023): a bubble of (pp - 1)(F + I - W) = pp - 1 units per rank
        assert zb.makespan == 3 * m + pp - 1
        assert zb.bubble_fraction == Fraction(pp - 1, 3 * m + pp - 1)
    else:  # too few microbatches to fill the warmup; still at least one W per hop saved
        assert zb.bubble_fraction <= Fraction(2 * (pp - 1), 3 * m + 2 * (pp - 1))
    if pp > 1:
        assert zb.bubble_fraction < base.bubble_fraction
    # full activation sets (F until I) as in 1F1B; at most pp sets awaiting W, each only what W needs
    assert zb.peak_activations == base.peak_activations
    assert max(zb.peak_pending_w) <= min(pp, m)
    assert base.peak_pending_w == (0,) * pp
    check_dependencies(zb)


@pytest.mark.parametrize(("f", "b", "w"), [(1, 3, 1), (2, 3, 2), (Fraction(1, 3), 1, Fraction(1, 5))])
def test_zero_bubble_stays_ahead_of_1f1b_under_other_costs(f, b, w):
    for pp in (2, 4, 8):
        for m in (1, pp, 3 * pp):
            zb = simulate(build("zero-bubble", pp=pp, microbatches=m), f, b, w)
            assert zb.bubble_fraction < simulate(build("1f1b", pp=pp, microbatches=m), f, b).bubble_fraction
            check_dependencies(zb)


def test_split_backward_costs_default_to_halves_and_follow_weight():
    sim = simulate(build("zero-bubble", pp=1, microbatches=1), 1, 4)
    assert [(s.action.kind, s.start, s.end) for s in sim.timelines[0]] == [("F", 0, 1), ("I", 1, 3), ("W", 3, 5)]
    sim = simulate(build("zero-bubble", pp=1, microbatches=1), 1, 4, 1)
    assert [(s.start, s.end) for s in sim.timelines[0]] == [(0, 1), (1, 4), (4, 5)]


def test_chunk_actions_cost_their_share_of_a_rank():
    sim = simulate(build("interleaved-1f1b", pp=2, microbatches=2, vpp=2), 1, 2)
    durations = {(s.action.kind, s.end - s.start) for line in sim.timelines for s in line}
    assert durations == {("F", 0.5), ("B", 1.0)}


def test_communication_cost_delays_every_cross_rank_dependency():
    sim = simulate(build("1f1b", pp=2, microbatches=1), 1, 2, comm=Fraction(1, 2))
    assert [(s.start, s.end) for s in sim.timelines[1]] == [(Fraction(3, 2), Fraction(5, 2)), (Fraction(5, 2), 4.5)]
    assert [(s.start, s.end) for s in sim.timelines[0]] == [(0, 1), (5, 7)]
    assert sim.makespan == 7
    for name in ("1f1b", "zero-bubble", "gpipe"):
        check_dependencies(simulate(build(name, pp=4, microbatches=6), comm=Fraction(1, 4)), comm=Fraction(1, 4))


def test_a_single_rank_has_no_bubble():
    for name in ("gpipe", "1f1b", "zero-bubble"):
        sim = simulate(build(name, pp=1, microbatches=4))
        assert sim.bubble_fraction == 0
        assert sim.makespan == 12


def test_floats_work_too():
    sim = simulate(build("1f1b", pp=4, microbatches=8))
    assert sim.bubble_fraction == pytest.approx(3 / 11)
    assert sim.makespan == pytest.approx(33)


@pytest.mark.parametrize(
    ("kwargs", "rule"),
    [
        ({"forward": 0}, "forward=0 must be a number > 0"),
        ({"backward": -1}, "backward=-1 must be a number > 0"),
        ({"weight": 2}, "0 < weight < backward=2"),
        ({"weight": 0}, "weight=0"),
        ({"comm": -1}, "comm=-1 must be a number >= 0"),
        ({"forward": "1"}, "forward='1'"),
    ],
)
def test_bad_costs_are_refused(kwargs, rule):
    with pytest.raises(PipelineScheduleError, match=rule):
        simulate(build("zero-bubble", pp=2, microbatches=2), **kwargs)


def test_simulate_checks_the_schedule_first():
    schedule = build("1f1b", pp=2, microbatches=2)
    with pytest.raises(PipelineScheduleError, match="has no F for microbatch 1"):
        simulate(schedule.with_actions([list(schedule.actions[0]), [Action("F", 0), Action("B", 0)]]))

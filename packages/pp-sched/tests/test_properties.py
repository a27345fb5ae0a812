"""Property tests: any buildable schedule is sound and meets its closed form under any costs, and any
edit of a schedule is either accepted (and then runs) or refused with a ``PipelineScheduleError``."""

from collections import Counter
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from pp_sched import PipelineScheduleError, build, simulate, validate

costs = st.fractions(min_value=Fraction(1, 8), max_value=8, max_denominator=8)


@st.composite
def requests(draw):
    name = draw(st.sampled_from(["gpipe", "1f1b", "interleaved-1f1b", "zero-bubble"]))
    if name == "interleaved-1f1b":
        pp = draw(st.integers(2, 8))
        vpp = draw(st.integers(2, 4))
        m = pp * draw(st.integers(1, 4))
        return name, pp, m, vpp
    return name, draw(st.integers(1, 12)), draw(st.integers(1, 24)), 1


@settings(max_examples=150, deadline=None)
@given(requests(), costs, costs)
def test_built_schedules_are_sound_and_meet_their_closed_forms(request, f, b):
    name, pp, m, vpp = request
    schedule = build(name, pp=pp, microbatches=m, vpp=vpp)
    validate(schedule)
    sim = simulate(schedule, f, b)
    assert sim.makespan >= m * (f + b)  # no rank can be faster than its own work
    assert sum(sim.idle_fractions) / pp == sim.bubble_fraction
    if name in ("gpipe", "1f1b"):
        assert sim.bubble_fraction == Fraction(pp - 1, m + pp - 1)
    elif name == "interleaved-1f1b":
        assert sim.bubble_fraction == Fraction(pp - 1, vpp * m + pp - 1)
    else:
        assert sim.peak_activations == tuple(min(pp - r, m) for r in range(pp))


@st.composite
def edits(draw):
    name, pp, m, vpp = draw(requests())
    schedule = build(name, pp=min(pp, 4), microbatches=min(m, 8) if vpp == 1 else min(pp, 4), vpp=vpp)
    ranks = [list(a) for a in schedule.actions]
    for _ in range(draw(st.integers(1, 3))):
        rank = draw(st.integers(0, schedule.pp - 1))
        i = draw(st.integers(0, len(ranks[rank]) - 1))
        j = draw(st.integers(0, len(ranks[rank]) - 1))
        if draw(st.booleans()):
            ranks[rank][i], ranks[rank][j] = ranks[rank][j], ranks[rank][i]
        else:
            ranks[rank].insert(j, ranks[rank].pop(i))
    return schedule.with_actions(ranks)


@settings(max_examples=300, deadline=None)
@given(edits())
def test_edited_schedules_are_accepted_and_run_or_refused_with_a_reason(schedule):
    try:
        validate(schedule)
    except PipelineScheduleError as err:
        assert str(err)
        return
    sim = simulate(schedule)
    counts = Counter(
        (slot.action.kind, slot.action.microbatch, schedule.stage_of(rank, slot.action.chunk))
        for rank, line in enumerate(sim.timelines)
        for slot in line
    )
    assert set(counts.values()) == {1}
    assert sum(len(line) for line in sim.timelines) == sum(len(a) for a in schedule.actions)

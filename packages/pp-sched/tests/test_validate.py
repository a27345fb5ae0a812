"""``validate``: hand-edited schedules are caught before they run, with the offending action named."""

import re

import pytest

from pp_sched import Action, PipelineScheduleError, Schedule, build, simulate, validate


def edit(schedule: Schedule, rank: int, actions: list[Action]) -> Schedule:
    ranks = [list(a) for a in schedule.actions]
    ranks[rank] = actions
    return schedule.with_actions(ranks)


def F(mb, chunk=0):
    return Action("F", mb, chunk)


def B(mb, chunk=0):
    return Action("B", mb, chunk)


def I_(mb):
    return Action("I", mb)


def W_(mb):
    return Action("W", mb)


def test_a_backward_before_its_forward_is_named():
    schedule = build("1f1b", pp=2, microbatches=2)  # rank 1: F0 B0 F1 B1
    wrong = edit(schedule, 1, [B(0), F(0), F(1), B(1)])
    with pytest.raises(
        PipelineScheduleError, match=re.escape("rank 1 action 0 B(microbatch=0, chunk=0) comes before F")
    ):
        validate(wrong)


def test_a_missing_backward_is_named():
    schedule = build("gpipe", pp=2, microbatches=3)
    wrong = edit(schedule, 0, [F(0), F(1), F(2), B(0), B(2)])
    with pytest.raises(
        PipelineScheduleError, match=r"stage 0 \(rank 0, chunk 0\) has no B \(or I and W\) for microbatch 1"
    ):
        validate(wrong)


def test_a_missing_forward_is_named():
    schedule = build("1f1b", pp=2, microbatches=2)
    wrong = edit(schedule, 1, [F(0), B(0), B(1)])
    with pytest.raises(PipelineScheduleError, match=r"stage 1 \(rank 1, chunk 0\) has no F for microbatch 1"):
        validate(wrong)


def test_a_duplicate_is_named():
    schedule = build("1f1b", pp=2, microbatches=2)
    wrong = edit(schedule, 0, [F(0), F(1), B(0), F(1), B(1)])
    with pytest.raises(
        PipelineScheduleError, match=re.escape("rank 0 runs F(microbatch=1, chunk=0) twice (actions 1 and 3)")
    ):
        validate(wrong)


def test_out_of_range_microbatch_and_chunk_are_named():
    schedule = build("1f1b", pp=2, microbatches=2)
    with pytest.raises(PipelineScheduleError, match=r"names microbatch 2, but microbatches=2"):
        validate(edit(schedule, 0, [F(0), F(1), B(0), B(1), F(2)]))
    with pytest.raises(PipelineScheduleError, match=r"names chunk 1, but vpp=1"):
        validate(edit(schedule, 0, [F(0), F(1), B(0), B(1), F(0, 1)]))


def test_split_backward_must_be_whole_and_ordered():
    schedule = build("zero-bubble", pp=1, microbatches=2)  # F0 I0 W0 F1 I1 W1
    assert [a.label for a in schedule.actions[0]] == ["F0", "I0", "W0", "F1", "I1", "W1"]
    with pytest.raises(PipelineScheduleError, match=re.escape("action 1 W(microbatch=0, chunk=0) comes before I")):
        validate(edit(schedule, 0, [F(0), W_(0), I_(0), F(1), I_(1), W_(1)]))
    with pytest.raises(PipelineScheduleError, match="has I but no W for microbatch 1"):
        validate(edit(schedule, 0, [F(0), I_(0), W_(0), F(1), I_(1)]))
    with pytest.raises(PipelineScheduleError, match="has both B and a split I/W backward for microbatch 0"):
        validate(edit(schedule, 0, [F(0), I_(0), W_(0), B(0), F(1), I_(1), W_(1)]))


def test_a_cross_rank_deadlock_names_every_stuck_action_and_what_it_waits_for():
    schedule = build("1f1b", pp=2, microbatches=2)
    # rank 0 wants microbatch 0's gradient before sending microbatch 1; rank 1 wants microbatch 1 first.
    wrong = schedule.with_actions([[F(0), B(0), F(1), B(1)], [F(0), F(1), B(1), B(0)]])
    with pytest.raises(PipelineScheduleError) as caught:
        validate(wrong)
    message = str(caught.value)
    assert message.startswith("deadlock: no rank can make progress")
    assert "rank 0 is stuck at action 1 B(microbatch=0, chunk=0), waiting for the B or I of microbatch 0" in message
    assert "rank 1 is stuck at action 1 F(microbatch=1, chunk=0), waiting for F(microbatch=1, chunk=0)" in message
    assert "on stage 0 (rank 0, itself stuck at action 1 B(microbatch=0, chunk=0))" in message


def test_a_hand_edited_1f1b_that_would_hang_is_caught_before_it_runs():
    schedule = build("1f1b", pp=4, microbatches=8)
    ranks = [list(a) for a in schedule.actions]
    ranks[0].remove(B(0))
    ranks[0].insert(1, B(0))  # F0 B0 F1 ...: the gradient of microbatch 0 needs rank 1's F1 first
    with pytest.raises(PipelineScheduleError, match=re.escape("rank 0 is stuck at action 1 B(microbatch=0, chunk=0)")):
        validate(schedule.with_actions(ranks))
    with pytest.raises(PipelineScheduleError, match="deadlock"):
        simulate(schedule.with_actions(ranks))


def test_interleaved_chunks_out_of_order_on_one_rank_deadlock():
    schedule = build("interleaved-1f1b", pp=2, microbatches=2, vpp=2)
    ranks = [list(a) for a in schedule.actions]
    first, second = ranks[0].index(F(0, 0)), ranks[0].index(F(0, 1))
    ranks[0][first], ranks[0][second] = ranks[0][second], ranks[0][first]
    with pytest.raises(PipelineScheduleError, match=re.escape("rank 0 is stuck at action 0 F(microbatch=0, chunk=1)")):
        validate(schedule.with_actions(ranks))


def test_a_reordered_but_sound_schedule_is_accepted():
    schedule = build("1f1b", pp=2, microbatches=3)
    # rank 0 runs GPipe order: slower, but nothing waits forever
    validate(edit(schedule, 0, [F(0), F(1), F(2), B(0), B(1), B(2)]))


def test_validate_refuses_things_that_are_not_schedules():
    with pytest.raises(PipelineScheduleError, match="expected a Schedule, got list"):
        validate([[F(0), B(0)]])

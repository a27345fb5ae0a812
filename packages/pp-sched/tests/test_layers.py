"""``split_layers``: every layer on exactly one stage, embedding first, head last, uneven when asked."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pp_sched import PipelineScheduleError, build, split_layers


def test_even_split_with_looped_placement():
    stages = split_layers(8, pp=2, vpp=2)
    assert [list(s.layers) for s in stages] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [(s.rank, s.chunk) for s in stages] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    schedule = build("interleaved-1f1b", pp=2, microbatches=2, vpp=2)
    assert all(schedule.stage_of(s.rank, s.chunk) == s.stage for s in stages)
    assert [(s.embedding, s.head) for s in stages] == [(True, False), (False, False), (False, False), (False, True)]


def test_embedding_and_head_count_as_a_layer_each():
    stages = split_layers(10, pp=4, uneven="embedding-head")
    assert [len(s.layers) for s in stages] == [2, 3, 3, 2]
    assert [s.layers.start for s in stages] == [0, 2, 5, 8]
    assert [len(s.layers) for s in split_layers(1, pp=1, uneven="embedding-head")] == [1]


def test_explicit_counts():
    stages = split_layers(7, pp=2, vpp=2, uneven=[1, 2, 3, 1])
    assert [list(s.layers) for s in stages] == [[0], [1, 2], [3, 4, 5], [6]]
    assert [len(s.layers) for s in split_layers(3, pp=3, uneven=(0, 3, 0))] == [0, 3, 0]


@pytest.mark.parametrize(
    ("args", "kwargs", "rule"),
    [
        ((10,), {"pp": 4}, "num_layers=10 does not split evenly over pp\\*vpp=4 stages"),
        ((9,), {"pp": 4, "uneven": "embedding-head"}, "num_layers\\+2=11 must be divisible by pp\\*vpp=4"),
        ((8,), {"pp": 2, "uneven": "first-last"}, "uneven='first-last' is not"),
        ((8,), {"pp": 2, "uneven": [4, 3]}, "sums to 7, but num_layers=8"),
        ((8,), {"pp": 2, "uneven": [8]}, "lists 1 layer counts but there are pp\\*vpp=2 stages"),
        ((8,), {"pp": 2, "uneven": [9, -1]}, "uneven\\[1\\]=-1 must be an integer >= 0"),
        ((0,), {"pp": 2}, "num_layers=0 must be an integer >= 1"),
        ((8,), {"pp": 2, "vpp": 0}, "vpp=0"),
    ],
)
def test_bad_splits_are_refused(args, kwargs, rule):
    with pytest.raises(PipelineScheduleError, match=rule):
        split_layers(*args, **kwargs)


@settings(deadline=None)  # hypothesis' default 200 ms per example is a clock a loaded machine can miss
@given(st.integers(1, 8), st.integers(1, 4), st.integers(1, 5), st.booleans())
def test_every_layer_is_on_exactly_one_stage_in_order(pp, vpp, per_stage, account):
    stages_n = pp * vpp
    num_layers = per_stage * stages_n - (2 if account else 0)
    if num_layers < 1:
        return
    stages = split_layers(num_layers, pp=pp, vpp=vpp, uneven="embedding-head" if account else None)
    assert [layer for s in stages for layer in s.layers] == list(range(num_layers))
    assert sum(s.embedding for s in stages) == sum(s.head for s in stages) == 1
    assert stages[0].embedding and stages[-1].head

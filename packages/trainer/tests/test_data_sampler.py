"""The global sample order is independent of the data-parallel size, and a saved position resumes at any size.

Exact equality of token arrays: the samples are the same integers, whatever the layout.
"""

from __future__ import annotations

import numpy as np
import pytest

from trainer.data.blending import BlendedDataset
from trainer.data.errors import DataError
from trainer.data.sampler import DataIterator, microbatches_per_step, rank_microbatches
from trainer.data.samples import SampleDataset
from trainer.data.testing import run_length_dataset

GLOBAL_BATCH = 8


@pytest.fixture(params=["single", "blend"])
def dataset(request, tmp_path):
    parts = [
        SampleDataset(run_length_dataset(tmp_path / f"d{i}", [13, 4, 22 + i, 9, 7]), 5, seed=10 + i) for i in range(2)
    ]
    return parts[0] if request.param == "single" else BlendedDataset(parts, [0.7, 0.3])


def _step(dataset, step, dp, micro, consumed=None):
    """The samples of every rank of ``step``, rank after rank, each rank's micro-batches in order."""
    loaders = [
        DataIterator(
            dataset,
            global_batch=GLOBAL_BATCH,
            micro_batch=micro,
            dp_size=dp,
            dp_rank=r,
            consumed_samples=step * GLOBAL_BATCH if consumed is None else consumed,
        )
        for r in range(dp)
    ]
    per_rank = [next(loader) for loader in loaders]
    assert all(len(batches) == GLOBAL_BATCH // (micro * dp) for batches in per_rank)
    assert all(b.shape == (micro, dataset.seq_len + 1) for batches in per_rank for b in batches)
    return np.concatenate([b for batches in per_rank for b in batches])


@pytest.mark.parametrize(("dp", "micro"), [(1, 1), (1, 8), (2, 1), (2, 2), (4, 1), (4, 2), (8, 1)])
def test_a_step_reads_the_same_samples_in_the_same_order_at_every_dp(dataset, dp, micro):
    for step in (0, 1, 7):  # step 7 is past the first epoch of the smallest dataset
        expected = dataset.batch(range(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH))
        assert np.array_equal(_step(dataset, step, dp, micro), expected)


def test_resuming_at_another_dp_continues_with_exactly_the_unseen_samples(dataset):
    reference = DataIterator(dataset, global_batch=GLOBAL_BATCH, micro_batch=2)
    steps = [np.concatenate(next(reference)) for _ in range(6)]
    for dp_before, dp_after, j in [(2, 4, 2), (4, 1, 3), (1, 2, 1), (8, 2, 4)]:
        before = [
            DataIterator(dataset, global_batch=GLOBAL_BATCH, micro_batch=1, dp_size=dp_before, dp_rank=r)
            for r in range(dp_before)
        ]
        for _ in range(j):
            for loader in before:
                next(loader)
        states = [loader.state_dict() for loader in before]
        assert all(s == states[0] for s in states) and states[0]["consumed_samples"] == j * GLOBAL_BATCH
        after = [
            DataIterator(dataset, global_batch=GLOBAL_BATCH, micro_batch=2, dp_size=dp_after, dp_rank=r)
            for r in range(dp_after)
        ]
        for loader in after:
            loader.load_state_dict(states[0])
        for step in range(j, 6):
            got = np.concatenate([b for loader in after for b in next(loader)])
            assert np.array_equal(got, steps[step]), (dp_before, dp_after, j, step)


def test_rank_blocks_partition_the_step():
    blocks = [rank_microbatches(16, 12, 3, 2, r) for r in range(2)]
    assert blocks == [[range(16, 19), range(19, 22)], [range(22, 25), range(25, 28)]]
    assert microbatches_per_step(12, 3, 2) == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"global_batch": 10, "micro_batch": 2, "dp_size": 4},
            r"global_batch=10 is not divisible by micro_batch \* dp",
        ),
        ({"global_batch": 0, "micro_batch": 1, "dp_size": 1}, "global_batch=0 must be positive"),
        ({"global_batch": 8, "micro_batch": 1, "dp_size": 2, "dp_rank": 2}, r"dp_rank=2 must be in \[0, dp_size=2\)"),
        ({"global_batch": 8, "micro_batch": 1, "consumed_samples": -8}, "consumed_samples=-8 must not be negative"),
    ],
)
def test_bad_batch_settings_are_named(dataset, kwargs, message):
    with pytest.raises(DataError, match=message):
        DataIterator(dataset, **kwargs)


def test_a_position_from_other_data_is_refused_unless_not_strict(tmp_path, dataset):
    other = SampleDataset(run_length_dataset(tmp_path / "other", [40]), 5, seed=0)
    state = DataIterator(other, global_batch=8, micro_batch=8).state_dict()
    loader = DataIterator(dataset, global_batch=8, micro_batch=8)
    with pytest.raises(DataError, match="the saved data position is for dataset"):
        loader.load_state_dict({**state, "consumed_samples": 16})
    loader.load_state_dict({**state, "consumed_samples": 16}, strict=False)
    assert np.array_equal(next(loader)[0], dataset.batch(range(16, 24)))
    with pytest.raises(DataError, match="must be a non-negative int"):
        loader.load_state_dict({"consumed_samples": 1.5})

"""Blending: the exact share per period, the share at every prefix, and each dataset read in its own order."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.data.blending import MAX_PERIOD, BlendedDataset, blend_counts
from trainer.data.errors import DataError
from trainer.data.samples import SampleDataset
from trainer.data.testing import run_length_dataset


def test_counts_are_exact_for_simple_fractions_and_rounded_otherwise():
    assert blend_counts([0.3, 0.7]).tolist() == [3, 7]
    assert blend_counts([1, 1, 2]).tolist() == [1, 1, 2]
    assert blend_counts([2.0]).tolist() == [1]
    odd = blend_counts([1 / np.pi, 1 / np.e, 0.1])
    assert odd.sum() == MAX_PERIOD
    w = np.array([1 / np.pi, 1 / np.e, 0.1])
    assert np.all(np.abs(odd / MAX_PERIOD - w / w.sum()) <= 1 / MAX_PERIOD)


@pytest.mark.parametrize(
    ("weights", "message"),
    [([], "at least one weight"), ([1, 0], "must be positive"), ([1, float("nan")], "finite"), ([1, 1e-9], "below")],
)
def test_bad_weights(weights, message):
    with pytest.raises(DataError, match=message):
        blend_counts(weights)


@pytest.fixture
def parts(tmp_path):
    return [
        SampleDataset(run_length_dataset(tmp_path / f"d{i}", [7 + i, 20, 5 * i + 3]), 3, seed=i, name=f"d{i}")
        for i in range(3)
    ]


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1, 1, 1], [0.61, 0.29, 0.1], [1 / np.pi, 1 / np.e, 0.01]])
def test_every_prefix_has_its_share_and_each_dataset_is_read_in_order(parts, weights):
    blend = BlendedDataset(parts, weights)
    w = blend.counts / blend.period
    n = min(3 * blend.period, 20_000)
    located = [blend.locate(g) for g in range(n)]
    counts = np.zeros(3)
    next_index = [0, 0, 0]
    for g, (d, i) in enumerate(located, start=1):
        assert i == next_index[d]  # dataset d's samples 0, 1, 2, ... in turn
        next_index[d] += 1
        counts[d] += 1
        assert np.all(np.abs(counts - g * w) <= (1 + 3 * w) / 2 + 1e-9)
        if g % blend.period == 0:
            assert counts.tolist() == (g // blend.period * blend.counts).tolist()
    g = 5 * blend.period + 2
    d, i = blend.locate(g)
    assert np.array_equal(blend[g], parts[d][i]) and blend.batch([g, 0]).shape == (2, 4)


def test_blend_refuses_mismatched_inputs(parts, tmp_path):
    with pytest.raises(DataError, match="3 datasets but 2 weights"):
        BlendedDataset(parts, [1, 1])
    other = SampleDataset(run_length_dataset(tmp_path / "o", [50]), 5, seed=0)
    with pytest.raises(DataError, match=r"share one seq_len, got \[3, 5\]"):
        BlendedDataset([parts[0], other], [1, 1])
    assert "d0: 1/3" in repr(BlendedDataset(parts, [1, 1, 1]))

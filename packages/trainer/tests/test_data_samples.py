"""Samples across document boundaries, the split by document, and epochs; all checked exactly against an
independent reconstruction (documents are runs of one distinct token, so any stretch tells its source)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from trainer.data.errors import DataError
from trainer.data.samples import SampleDataset, split_documents
from trainer.data.testing import run_length_dataset

LENGTHS = [5, 1, 17, 3, 9, 2, 30, 4, 11, 6]


def _epoch_stream(ds: SampleDataset, epoch: int) -> list[int]:
    """The epoch's token stream, rebuilt from its samples placed at their positions, checked to overlap."""
    n, s = ds.samples_per_epoch, ds.seq_len
    stream: list[int | None] = [None] * (n * s + 1)
    for g in range(epoch * n, (epoch + 1) * n):
        e, k = ds.locate(g)
        assert e == epoch
        sample = ds[g].tolist()
        assert len(sample) == s + 1
        for i, t in enumerate(sample):
            assert stream[k * s + i] in (None, t)
            stream[k * s + i] = t
    assert None not in stream
    return stream


def _runs(stream: list[int]) -> list[tuple[int, int]]:
    return [(token, len(list(group))) for token, group in itertools.groupby(stream)]


@pytest.mark.parametrize("seq_len", [1, 4, 7])
def test_each_epoch_is_a_shuffled_concatenation_of_all_documents_cut_into_overlapping_samples(tmp_path, seq_len):
    data = run_length_dataset(tmp_path / "d", LENGTHS)
    ds = SampleDataset(data, seq_len=seq_len, seed=3)
    total = sum(LENGTHS)
    assert ds.samples_per_epoch == (total - 1) // seq_len
    orders = []
    for epoch in range(3):
        stream = _epoch_stream(ds, epoch)  # every sample of the epoch visited once, at its own place
        runs = _runs(stream)
        order = [token - 1 for token, _ in runs]
        # whole documents in some order, each once; the stream ends within the last sample's reach
        assert all(length == LENGTHS[token - 1] for token, length in runs[:-1])
        assert len(set(order)) == len(order) and runs[-1][1] <= LENGTHS[order[-1]]
        assert total - len(stream) < seq_len
        orders.append(order)
        samples = [
            int(ds.locate(g)[1]) for g in range(epoch * ds.samples_per_epoch, (epoch + 1) * ds.samples_per_epoch)
        ]
        assert sorted(samples) == list(range(ds.samples_per_epoch))
    assert orders[0] != orders[1] or orders[1] != orders[2]  # each epoch reshuffled
    some_span = any(len(set(ds[g].tolist())) > 1 for g in range(ds.samples_per_epoch))
    assert some_span or seq_len == 1  # samples cross document boundaries


def test_order_is_a_function_of_the_seed(tmp_path):
    data = run_length_dataset(tmp_path / "d", LENGTHS)
    a, b, c = (SampleDataset(data, 4, seed) for seed in (1, 1, 2))
    indices = [7, 0, 30, 3, 100, 12]  # any access order, across epochs
    assert np.array_equal(a.batch(indices), b.batch(indices[::-1])[::-1])
    assert not np.array_equal(a.batch(range(20)), c.batch(range(20)))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert a.batch([]).shape == (0, 5) and a.batch([1, 2]).dtype == np.int64


def test_documents_subset_and_errors(tmp_path):
    data = run_length_dataset(tmp_path / "d", LENGTHS)
    ds = SampleDataset(data, 2, seed=0, documents=np.array([0, 6]))
    tokens = {t for g in range(3 * ds.samples_per_epoch) for t in ds[g].tolist()}
    assert tokens == {1, 7}
    with pytest.raises(DataError, match=r"2 documents of 6 tokens in all cannot fill one sample of seq_len \+ 1 = 7"):
        SampleDataset(data, 6, seed=0, documents=np.array([0, 1]))
    with pytest.raises(DataError, match=r"document ids must be in \[0, 10\)"):
        SampleDataset(data, 2, seed=0, documents=np.array([10]))
    with pytest.raises(DataError, match="seq_len=0 must be positive"):
        SampleDataset(data, 0, seed=0)
    with pytest.raises(IndexError):
        ds[-1]


def test_split_by_document_is_deterministic_disjoint_and_complete():
    train, valid = split_documents(100, 0.1, seed=7)
    assert len(valid) == 10 and len(train) == 90
    assert sorted([*train, *valid]) == list(range(100)) and not set(train) & set(valid)
    assert all(np.array_equal(x, y) for x, y in zip((train, valid), split_documents(100, 0.1, seed=7)))
    assert not np.array_equal(valid, split_documents(100, 0.1, seed=8)[1])
    assert valid.tolist() != list(range(10))  # chosen at random, not the first documents
    assert len(split_documents(10, 0.01)[1]) == 1 and len(split_documents(10, 0.0)[1]) == 0
    assert len(split_documents(10, 0.99)[0]) == 1  # some documents are always left to train on
    with pytest.raises(DataError, match=r"valid_fraction=1.0 must be in \[0, 1\)"):
        split_documents(10, 1.0)
    with pytest.raises(DataError, match="needs at least 2 documents"):
        split_documents(1, 0.5)

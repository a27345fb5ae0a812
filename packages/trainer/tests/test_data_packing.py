"""The packer: whole documents in ``seq_len`` tokens, long ones split, no token lost, targets inside documents.

Token ``t`` of the test data is its global index + 1, so a token tells its document and place, the next token
of its document is ``t + 1``, and every check below is exact.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from trainer.data import IGNORE, DataConfig, DataError, PackedDataset, build_datasets, write_dataset
from trainer.data.indexed import dataset_paths
from trainer.data.packing import best_fit, split_pieces
from trainer.model import document_positions

LENGTHS = [5, 1, 17, 3, 9, 2, 30, 4, 11, 6, 8]
SEQ = 8


def numbered(prefix, lengths=LENGTHS):
    """Documents of ``lengths`` whose tokens are their global index + 1 (tokenizer 'byte': ids < 256)."""
    ends = np.cumsum(lengths)
    docs = [np.arange(end - n, end) + 1 for n, end in zip(lengths, ends)]
    return write_dataset(prefix, docs, vocab_size=256, meta={"tokenizer": "byte"})


def doc_of(token: int) -> int:
    return int(np.searchsorted(np.cumsum(LENGTHS), token - 1, side="right"))


def last_of_doc(token: int) -> bool:
    return token in set(np.cumsum(LENGTHS).tolist())


def epoch_samples(ds, epoch):
    return [ds[g] for g in range(epoch * ds.samples_per_epoch, (epoch + 1) * ds.samples_per_epoch)]


def test_every_token_is_packed_once_per_epoch_in_whole_documents_or_seq_len_pieces(tmp_path):
    ds = PackedDataset(numbered(tmp_path / "d"), SEQ, seed=3)
    assert ds.samples_per_epoch >= -(-sum(LENGTHS) // SEQ)
    for epoch in range(2):
        seen = []
        for sample in epoch_samples(ds, epoch):
            inputs, labels, ids = sample
            assert sample.shape == (3, SEQ) and sample.dtype == np.int64
            assert ids[0] == 0 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)
            real = inputs > 0
            assert not np.any(real[1:] & ~real[:-1]), "padding only at the end"
            for d in np.unique(ids[real]):
                piece = inputs[ids == d]
                # one piece: consecutive tokens of one document, all of it or seq_len tokens of it
                assert np.all(np.diff(piece) == 1) and doc_of(piece[0]) == doc_of(piece[-1])
                whole = LENGTHS[doc_of(piece[0])]
                assert (
                    len(piece) == whole
                    or len(piece) == SEQ
                    or (piece[0] - 1 - sum(LENGTHS[: doc_of(piece[0])])) % SEQ == 0
                )
            for t, label in zip(inputs[real], labels[real]):
                assert label == (IGNORE if last_of_doc(t) else t + 1), f"target of token {t}"
            assert np.all(labels[~real] == IGNORE) and np.all(ids[~real] == ids[real].max() + 1)
            seen += inputs[real].tolist()
        assert sorted(seen) == list(range(1, sum(LENGTHS) + 1))


def test_epochs_visit_the_same_packed_samples_in_another_order(tmp_path):
    ds = PackedDataset(numbered(tmp_path / "d"), SEQ, seed=3)
    first, second = ([s.tobytes() for s in epoch_samples(ds, e)] for e in (0, 1))
    assert sorted(first) == sorted(second) and first != second
    again = PackedDataset(numbered(tmp_path / "e"), SEQ, seed=3)
    assert np.array_equal(again.batch(range(5)), ds.batch(range(5))) and again.fingerprint() == ds.fingerprint()
    assert ds.batch([]).shape == (0, 3, SEQ) and ds.batch([0, 4]).shape == (2, 3, SEQ)


def test_long_documents_are_split_into_seq_len_pieces():
    doc, offset, length = split_pieces(np.array([3, 0, 17, 8]), 8)
    assert doc.tolist() == [0, 2, 2, 2, 3] and offset.tolist() == [0, 0, 8, 16, 0]
    assert length.tolist() == [3, 8, 8, 1, 8]


def test_best_fit_puts_each_piece_in_the_fullest_sample_that_holds_it():
    assert best_fit(np.array([5, 6, 3, 2, 4, 8]), 8).tolist() == [0, 1, 0, 1, 2, 3]


def test_positions_restart_at_each_document():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 3, 3], [0, 0, 0, 0, 0, 0, 0, 0]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])
    assert torch.equal(document_positions(ids), expected)


def test_build_datasets_packs_when_asked(tmp_path):
    numbered(tmp_path / "d")
    data = build_datasets(DataConfig(paths=(str(tmp_path / "d"),), packing="pack"), seq_len=SEQ, seed=0)
    assert isinstance(data.train, PackedDataset) and isinstance(data.valid, PackedDataset)


def test_an_inconsistent_document_index_is_refused_naming_the_file(tmp_path):
    numbered(tmp_path / "d")
    _, idx = dataset_paths(tmp_path / "d")
    raw = bytearray(idx.read_bytes())
    offsets = np.frombuffer(raw, dtype="<u8", count=len(LENGTHS) + 1, offset=len(raw) - 8 * (len(LENGTHS) + 1)).copy()
    offsets[3] = offsets[1]  # document 2 now ends before it starts
    raw[len(raw) - offsets.nbytes :] = offsets.tobytes()
    idx.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=f"{re.escape(str(idx))}.*offsets"):
        build_datasets(DataConfig(paths=(str(tmp_path / "d"),), packing="pack"), seq_len=SEQ, seed=0)


def test_an_unknown_packing_is_refused_naming_the_field():
    with pytest.raises(DataError, match=re.escape("data.packing='bins': must be one of 'none', 'pack'")):
        DataConfig(packing="bins")

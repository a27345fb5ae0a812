"""The indexed dataset format: exact round trips, the dtype rule, and a named error for each kind of damage."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from trainer.data.errors import DataError
from trainer.data.indexed import MAGIC, IndexedDataset, dataset_paths, dtype_for_vocab, write_dataset


def _docs(rng, vocab, count=7):
    return [rng.integers(0, vocab, size=int(rng.integers(0, 50))) for _ in range(count)]


@pytest.mark.parametrize(
    ("vocab", "dtype"), [(257, "uint16"), (65536, "uint16"), (65537, "uint32"), (200_000, "uint32")]
)
def test_round_trip_with_the_smallest_dtype(tmp_path, vocab, dtype):
    docs = _docs(np.random.default_rng(vocab), vocab)
    ds = write_dataset(tmp_path / "d", docs, vocab, {"tokenizer": "t", "eos_id": None})
    assert ds.dtype == np.dtype(dtype) == dtype_for_vocab(vocab)
    assert isinstance(ds.tokens, np.memmap) and ds.bin_path.stat().st_size == ds.num_tokens * ds.dtype.itemsize
    assert len(ds) == len(docs) and ds.num_tokens == sum(len(d) for d in docs)
    reopened = IndexedDataset(tmp_path / "d.idx")  # either file's name is accepted as the prefix
    for i, doc in enumerate(docs):
        assert reopened[i].tolist() == doc.tolist()
    assert reopened[-1].tolist() == docs[-1].tolist()
    assert reopened.doc_lengths.tolist() == [len(d) for d in docs]
    assert (reopened.tokenizer, reopened.vocab_size, reopened.meta["eos_id"]) == ("t", vocab, None)
    with pytest.raises(IndexError):
        reopened[len(docs)]


def test_out_of_vocabulary_tokens_are_refused(tmp_path):
    with pytest.raises(DataError, match=r"document 1 has a token id outside \[0, 10\)"):
        write_dataset(tmp_path / "d", [[1, 2], [3, 10]], 10, {})
    assert not dataset_paths(tmp_path / "d")[1].exists()


@pytest.fixture
def written(tmp_path):
    write_dataset(tmp_path / "d", [[1, 2, 3], [4], [5, 6]], 300, {"tokenizer": "byte"})
    return dataset_paths(tmp_path / "d")


def _patch(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def test_missing_files_are_named(written, tmp_path):
    bin_path, _ = written
    with pytest.raises(DataError, match=r"index file .*nothing\.idx does not exist"):
        IndexedDataset(tmp_path / "nothing")
    bin_path.unlink()
    with pytest.raises(DataError, match=r"token file .*d\.bin does not exist"):
        IndexedDataset(tmp_path / "d")


def test_truncated_token_file(written):
    bin_path, _ = written
    bin_path.write_bytes(bin_path.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"token file .*d\.bin has 10 bytes but its index says 6 tokens of uint16"):
        IndexedDataset(bin_path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:20]), r"is truncated: 20 bytes, shorter than the 40-byte header"),
        (lambda p: p.write_bytes(p.read_bytes()[:-8]), r"is truncated or corrupt: \d+ bytes, expected \d+ for 3 doc"),
        (lambda p: _patch(p, 0, b"MMIDIDX\x00"), r"is not a trainer index \(magic b'MMIDIDX"),
        (lambda p: _patch(p, 8, struct.pack("<I", 9)), r"has format version 9; this reader knows version 1"),
        (lambda p: _patch(p, 12, struct.pack("<I", 7)), r"is corrupt: unknown token dtype code 7"),
        (lambda p: _patch(p, 40, b"\xff"), r"is corrupt: unreadable metadata"),
        (
            lambda p: _patch(p, p.stat().st_size - 16, struct.pack("<Q", 99)),
            r"is corrupt: its document offsets are not increasing",
        ),
    ],
)
def test_damaged_index_is_named(written, damage, message):
    _, idx_path = written
    assert idx_path.read_bytes()[:8] == MAGIC
    damage(idx_path)
    with pytest.raises(DataError, match=rf"index file .*d\.idx {message}"):
        IndexedDataset(idx_path)


def test_empty_dataset_opens(tmp_path):
    ds = write_dataset(tmp_path / "e", [], 10, {})
    assert len(ds) == 0 and ds.num_tokens == 0 and ds.tokens.size == 0

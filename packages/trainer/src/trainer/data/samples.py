"""Fixed-length training samples cut across document boundaries, in a seeded order, epoch after epoch.

Epoch ``e`` of a :class:`SampleDataset` lays its documents end to end in an order shuffled with the seed
``(seed, e)`` and cuts the stream into samples of ``seq_len + 1`` tokens that overlap by one token (the last
target of a sample is the first input of the next), so a sample may span several documents. The samples of
the epoch are then visited in an order shuffled with the same derived seed. Global sample ``g`` is sample
``g % samples_per_epoch`` of epoch ``g // samples_per_epoch``: the sequence never ends and is a pure function of
the data, ``seq_len`` and ``seed`` (numpy's PCG64 generator), whatever reads it and however many ranks.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from .errors import DataError
from .indexed import IndexedDataset

_SPLIT, _DOCS, _SAMPLES = 0, 1, 2  # streams of the seed sequence, so that no two uses share random numbers


def split_documents(num_docs: int, valid_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Documents ``0..num_docs-1`` split into sorted (train, valid) id arrays: a seeded random ``valid_fraction``
    of them (rounded; at least one when the fraction is positive, never all) is held out. Depends only on the
    arguments."""
    if not 0 <= valid_fraction < 1:
        raise DataError(f"valid_fraction={valid_fraction} must be in [0, 1)")
    if valid_fraction and num_docs < 2:
        raise DataError(f"valid_fraction={valid_fraction} needs at least 2 documents to split, the data has {num_docs}")
    n_valid = 0 if valid_fraction == 0 else min(max(1, round(valid_fraction * num_docs)), num_docs - 1)
    order = np.random.default_rng([seed, _SPLIT]).permutation(num_docs)
    return np.sort(order[n_valid:]), np.sort(order[:n_valid])


def checked_documents(
    data: IndexedDataset, seq_len: int, documents: np.ndarray | None, name: str
) -> tuple[str, np.ndarray]:
    """A sample dataset's name (default: the data's prefix) and the ids of the documents it draws from (default:
    all), refusing a non-positive ``seq_len`` and ids outside the data."""
    if seq_len < 1:
        raise DataError(f"seq_len={seq_len} must be positive")
    name = name or str(data.prefix)
    ids = np.arange(len(data)) if documents is None else np.asarray(documents, dtype=np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() >= len(data)):
        raise DataError(f"{name}: document ids must be in [0, {len(data)})")
    return name, ids


class SampleDataset:
    """Samples of ``seq_len + 1`` token ids (int64) from ``documents`` of an indexed dataset; ``ds[g]`` for any
    ``g >= 0``."""

    def __init__(
        self, data: IndexedDataset, seq_len: int, seed: int, documents: np.ndarray | None = None, name: str = ""
    ) -> None:
        self.data, self.seq_len, self.seed = data, seq_len, seed
        self.name, self.documents = checked_documents(data, seq_len, documents, name)
        self._lengths = data.doc_lengths[self.documents]
        self.num_tokens = int(self._lengths.sum())
        self.samples_per_epoch = max(0, (self.num_tokens - 1) // seq_len)
        if self.samples_per_epoch == 0:
            raise DataError(
                f"{self.name}: {len(self.documents)} documents of {self.num_tokens} tokens in all cannot fill one "
                f"sample of seq_len + 1 = {seq_len + 1} tokens"
            )
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        """A short hash of what decides the samples (tokens per document, documents, seq_len, seed, tokenizer)."""
        if self._fingerprint is None:
            h = hashlib.sha256(json.dumps([self.seq_len, self.seed, self.data.tokenizer]).encode())
            h.update(self.documents.astype("<i8").tobytes())
            h.update(self._lengths.astype("<i8").tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document order, start of each in the epoch's stream, sample order) of ``epoch``; the last two kept."""
        if epoch not in self._epochs:
            order = np.random.default_rng([self.seed, epoch, _DOCS]).permutation(self.documents)
            starts = np.concatenate([[0], np.cumsum(self.data.doc_lengths[order])])
            samples = np.random.default_rng([self.seed, epoch, _SAMPLES]).permutation(self.samples_per_epoch)
            if len(self._epochs) >= 2:
                del self._epochs[min(self._epochs)]
            self._epochs[epoch] = (order, starts, samples)
        return self._epochs[epoch]

    def locate(self, index: int) -> tuple[int, int]:
        """(epoch, position of the sample in that epoch's stream, in units of seq_len) of global sample ``index``."""
        if index < 0:
            raise IndexError(f"sample {index}: global sample indices start at 0")
        epoch, j = divmod(int(index), self.samples_per_epoch)
        return epoch, int(self._epoch(epoch)[2][j])

    def __getitem__(self, index: int) -> np.ndarray:
        epoch, k = self.locate(index)
        order, starts, _ = self._epoch(epoch)
        start, stop = k * self.seq_len, (k + 1) * self.seq_len + 1
        pos = int(np.searchsorted(starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            doc = int(order[pos])
            first = int(self.data.offsets[doc]) + start - int(starts[pos])
            take = min(stop, int(starts[pos + 1])) - start
            pieces.append(self.data.tokens[first : first + take])
            start += take
            pos += 1
        return np.concatenate(pieces).astype(np.int64)

    def batch(self, indices) -> np.ndarray:
        """Samples ``indices`` stacked: ``[len(indices), seq_len + 1]`` int64."""
        return np.stack([self[i] for i in indices]) if len(indices) else np.zeros((0, self.seq_len + 1), np.int64)

    def __repr__(self) -> str:
        return (
            f"SampleDataset({self.name!r}, documents={len(self.documents)}, seq_len={self.seq_len}, "
            f"samples_per_epoch={self.samples_per_epoch}, seed={self.seed})"
        )

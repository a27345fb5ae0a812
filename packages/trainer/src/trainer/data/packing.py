"""Packed samples: whole documents packed into ``seq_len`` tokens, with each token's document id.

Documents come from the indexed dataset's document boundaries. One longer than ``seq_len`` is cut into
pieces of ``seq_len`` tokens (the last one shorter); each piece is packed as a document of its own
(attention and positions restart at it), but a piece's last token keeps its real target, the next token of
the document, so no target is lost. The pieces, in an order shuffled with ``(seed, documents)``, are packed
once by best fit (each piece goes into the open sample with the least room that still holds it, else into a
new one). Epoch ``e`` visits those samples in an order shuffled with ``(seed, e)``: the packing does not
change between epochs, so ``samples_per_epoch`` is fixed and global sample ``g`` is a pure function of the
data, ``seq_len`` and ``seed``, as for :class:`~trainer.data.samples.SampleDataset`.

A sample is ``[3, seq_len]`` int64: input token ids, target ids and document ids (0, 1, ... along the
sample). The target of a document's last token is ``IGNORE`` (-100): no prediction crosses documents.
The room a sample has left is padding: token 0, target ``IGNORE``, a document id of its own. The
document boundaries are the index file's, checked when it is opened (:class:`IndexedDataset` names the
file whose offsets are inconsistent).
"""

from __future__ import annotations

import bisect
import hashlib
import json

import numpy as np

from .errors import DataError
from .indexed import IndexedDataset
from .samples import checked_documents

IGNORE = -100  # the target that has no loss (the loss's ignore_index)
_DOCS, _SAMPLES = 1, 2  # streams of the seed sequence, as in samples.py


def split_pieces(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(document index, offset, length)`` of the pieces of at most ``seq_len`` tokens that documents of
    ``lengths`` are cut into, in document order (empty documents give none)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    counts = -(-lengths // seq_len)
    doc = np.repeat(np.arange(len(lengths)), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    offset = (np.arange(len(doc)) - first) * seq_len
    return doc, offset, np.minimum(lengths[doc] - offset, seq_len)


def best_fit(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """The sample (bin) of each item of ``lengths`` (each ``<= capacity``), packed in order by best fit;
    samples are numbered in the order they are opened."""
    bins = np.empty(len(lengths), dtype=np.int64)
    room: list[tuple[int, int]] = []  # (free tokens, sample) of the samples not yet full, sorted
    opened = 0
    for i, n in enumerate(lengths.tolist()):
        j = bisect.bisect_left(room, (n, -1))
        if j == len(room):
            sample, free = opened, capacity
            opened += 1
        else:
            free, sample = room.pop(j)
        bins[i] = sample
        if free > n:
            bisect.insort(room, (free - n, sample))
    return bins


class PackedDataset:
    """Packed samples (``[3, seq_len]`` int64, see the module) of ``documents`` of an indexed dataset;
    ``ds[g]`` for any ``g >= 0``. Same interface as :class:`~trainer.data.samples.SampleDataset`."""

    def __init__(
        self, data: IndexedDataset, seq_len: int, seed: int, documents: np.ndarray | None = None, name: str = ""
    ) -> None:
        self.data, self.seq_len, self.seed = data, seq_len, seed
        self.name, self.documents = checked_documents(data, seq_len, documents, name)
        order = np.random.default_rng([seed, _DOCS]).permutation(self.documents)
        doc, self._offset, self._length = split_pieces(data.doc_lengths[order], seq_len)
        self._doc = order[doc]
        bins = best_fit(self._length, seq_len)
        self.samples_per_epoch = int(bins.max()) + 1 if len(bins) else 0
        if self.samples_per_epoch == 0:
            raise DataError(f"{self.name}: {len(self.documents)} documents hold no tokens to pack")
        self._pieces = np.argsort(bins, kind="stable")  # piece indices, sample by sample
        self._starts = np.searchsorted(bins[self._pieces], np.arange(self.samples_per_epoch + 1))
        self.num_tokens = int(self._length.sum())
        self._orders: dict[int, np.ndarray] = {}
        self._fingerprint: str | None = None

    @property
    def fill(self) -> float:
        """The share of sample tokens that are document tokens (the rest is padding)."""
        return self.num_tokens / (self.samples_per_epoch * self.seq_len)

    def fingerprint(self) -> str:
        """A short hash of what decides the samples (as SampleDataset's, and that they are packed)."""
        if self._fingerprint is None:
            h = hashlib.sha256(json.dumps(["pack", self.seq_len, self.seed, self.data.tokenizer]).encode())
            h.update(self.documents.astype("<i8").tobytes())
            h.update(self.data.doc_lengths[self.documents].astype("<i8").tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def locate(self, index: int) -> tuple[int, int]:
        """(epoch, packed sample) of global sample ``index``."""
        if index < 0:
            raise IndexError(f"sample {index}: global sample indices start at 0")
        epoch, j = divmod(int(index), self.samples_per_epoch)
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                del self._orders[min(self._orders)]
            self._orders[epoch] = np.random.default_rng([self.seed, epoch, _SAMPLES]).permutation(
                self.samples_per_epoch
            )
        return epoch, int(self._orders[epoch][j])

    def pieces(self, sample: int) -> list[tuple[int, int, int]]:
        """``(document, offset, length)`` of the pieces packed into ``sample``, in their order in it."""
        chosen = self._pieces[self._starts[sample] : self._starts[sample + 1]]
        return [(int(self._doc[p]), int(self._offset[p]), int(self._length[p])) for p in chosen]

    def __getitem__(self, index: int) -> np.ndarray:
        out = np.zeros((3, self.seq_len), dtype=np.int64)
        out[1] = IGNORE
        at = 0
        pieces = self.pieces(self.locate(index)[1])
        for i, (doc, offset, length) in enumerate(pieces):
            tokens = self.data[doc]
            out[0, at : at + length] = tokens[offset : offset + length]
            stop = min(offset + length + 1, len(tokens))
            out[1, at : at + stop - offset - 1] = tokens[offset + 1 : stop]
            out[2, at : at + length] = i
            at += length
        out[2, at:] = len(pieces)
        return out

    def batch(self, indices) -> np.ndarray:
        """Samples ``indices`` stacked: ``[len(indices), 3, seq_len]`` int64."""
        return np.stack([self[i] for i in indices]) if len(indices) else np.zeros((0, 3, self.seq_len), np.int64)

    def __repr__(self) -> str:
        return (
            f"PackedDataset({self.name!r}, documents={len(self.documents)}, seq_len={self.seq_len}, "
            f"samples_per_epoch={self.samples_per_epoch}, fill={self.fill:.3f}, seed={self.seed})"
        )

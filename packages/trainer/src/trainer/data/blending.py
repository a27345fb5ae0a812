"""Blending several sample datasets with weights, in a fixed interleaving (no randomness of its own).

The weights are normalised and written as whole counts ``c_d`` per period of ``P = sum(c_d)`` samples: exactly
when they are fractions with a common denominator up to 65536 (``0.3, 0.7`` gives the period ``3, 7``), else
rounded to ``P = 65536``. Within a period, dataset ``d``'s ``k``-th sample takes the slot ordered by
``(k + 0.5) / c_d`` (ties to the lower dataset, Sainte-Lague order): every prefix of ``n`` samples holds
``n * w_d`` samples of dataset ``d`` to within ``(1 + D * w_d) / 2`` for ``D`` datasets, and exactly
``n * w_d`` at the end of each period, like Megatron's greedy "largest weight error first" blending. Each
dataset's own samples are already shuffled, so the blend needs no seed; any global index is found in O(1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from .errors import DataError
from .samples import SampleDataset

MAX_PERIOD = 1 << 16


def blend_counts(weights: Sequence[float]) -> np.ndarray:
    """Whole counts per period proportional to ``weights`` (see the module docstring)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0:
        raise DataError("blending needs at least one weight")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise DataError(f"blend weights must be positive and finite, got {list(weights)}")
    fractions = [Fraction(x).limit_denominator(MAX_PERIOD) for x in w / w.sum()]
    period = math.lcm(*(f.denominator for f in fractions))
    if period <= MAX_PERIOD and sum(fractions) == 1:
        counts = np.array([int(f * period) for f in fractions], dtype=np.int64)
    else:
        exact = w / w.sum() * MAX_PERIOD
        counts = np.floor(exact).astype(np.int64)
        counts[np.argsort(-(exact - counts), kind="stable")[: MAX_PERIOD - counts.sum()]] += 1
    if np.any(counts == 0):
        raise DataError(f"blend weight {w[np.argmin(counts)]} is below 1/{MAX_PERIOD} of the total; drop that dataset")
    return counts


class BlendedDataset:
    """Global sample ``g`` of the blend is sample ``i`` of dataset ``d`` for a fixed ``(d, i)`` interleaving."""

    def __init__(self, datasets: Sequence[SampleDataset], weights: Sequence[float]) -> None:
        if len(datasets) != len(weights):
            raise DataError(f"{len(datasets)} datasets but {len(weights)} weights")
        lengths = {d.seq_len for d in datasets}
        if len(lengths) != 1:
            raise DataError(f"blended datasets must share one seq_len, got {sorted(lengths)}")
        self.datasets, self.seq_len = list(datasets), lengths.pop()
        self.counts = blend_counts(weights)
        which = np.repeat(np.arange(len(datasets)), self.counts)
        rank = np.concatenate([np.arange(c) for c in self.counts])
        order = np.lexsort((which, (rank + 0.5) / self.counts[which]))
        self._which, self._rank = which[order], rank[order]
        self.period = int(self.counts.sum())

    def locate(self, index: int) -> tuple[int, int]:
        """(dataset, its sample index) of global sample ``index``."""
        if index < 0:
            raise IndexError(f"sample {index}: global sample indices start at 0")
        q, r = divmod(int(index), self.period)
        d = int(self._which[r])
        return d, q * int(self.counts[d]) + int(self._rank[r])

    def __getitem__(self, index: int) -> np.ndarray:
        d, i = self.locate(index)
        return self.datasets[d][i]

    def batch(self, indices) -> np.ndarray:
        return np.stack([self[i] for i in indices]) if len(indices) else self.datasets[0].batch([])

    def fingerprint(self) -> str:
        return "+".join(f"{d.fingerprint()}*{c}" for d, c in zip(self.datasets, self.counts))

    def __repr__(self) -> str:
        parts = ", ".join(f"{d.name}: {c}/{self.period}" for d, c in zip(self.datasets, self.counts))
        return f"BlendedDataset({parts})"

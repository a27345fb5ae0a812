"""Which samples each data-parallel rank reads at each step, and the position in the data to checkpoint.

A step reads the next ``global_batch`` samples of the global order: samples ``consumed .. consumed +
global_batch - 1``. DP rank ``r`` of ``n`` takes the ``r``-th contiguous block of ``global_batch / n`` of them
and splits it into micro-batches of ``micro_batch``, so the ranks' blocks joined in rank order are the step's
samples in order, for every ``n``. The position is only ``consumed`` (a sample count): a run resumed from it at
any DP size, micro-batch size or number of micro-batches continues with exactly the samples not yet read.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from .errors import DataError


class Samples(Protocol):
    """What the loader reads: a :class:`SampleDataset`, a :class:`PackedDataset` or a :class:`BlendedDataset`."""

    seq_len: int

    def batch(self, indices) -> np.ndarray: ...

    def fingerprint(self) -> str: ...


def microbatches_per_step(global_batch: int, micro_batch: int, dp_size: int) -> int:
    """``global_batch / (micro_batch * dp_size)``, refused with the rule when it is not a positive whole number."""
    for name, value in (("global_batch", global_batch), ("micro_batch", micro_batch), ("dp_size", dp_size)):
        if value < 1:
            raise DataError(f"{name}={value} must be positive")
    if global_batch % (micro_batch * dp_size):
        raise DataError(
            f"global_batch={global_batch} is not divisible by micro_batch * dp = {micro_batch} * {dp_size} "
            f"= {micro_batch * dp_size}"
        )
    return global_batch // (micro_batch * dp_size)


def rank_microbatches(consumed: int, global_batch: int, micro_batch: int, dp_size: int, dp_rank: int) -> list[range]:
    """The global sample indices of each micro-batch of DP rank ``dp_rank`` for the step starting at ``consumed``."""
    count = microbatches_per_step(global_batch, micro_batch, dp_size)
    if not 0 <= dp_rank < dp_size:
        raise DataError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if consumed < 0:
        raise DataError(f"consumed_samples={consumed} must not be negative")
    first = consumed + dp_rank * (global_batch // dp_size)
    return [range(first + m * micro_batch, first + (m + 1) * micro_batch) for m in range(count)]


class DataIterator:
    """Yields, per step, this rank's micro-batches (``[micro_batch, seq_len + 1]`` int64 arrays: inputs are
    ``[:, :-1]``, targets ``[:, 1:]``; packed: ``[micro_batch, 3, seq_len]``, inputs, targets, document ids);
    ``state_dict()`` is the position to save in a checkpoint."""

    def __init__(
        self,
        dataset: Samples,
        *,
        global_batch: int,
        micro_batch: int,
        dp_size: int = 1,
        dp_rank: int = 0,
        consumed_samples: int = 0,
    ) -> None:
        self.microbatches = microbatches_per_step(global_batch, micro_batch, dp_size)
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if consumed_samples < 0:
            raise DataError(f"consumed_samples={consumed_samples} must not be negative")
        self.dataset = dataset
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_size, self.dp_rank = dp_size, dp_rank
        self.consumed_samples = consumed_samples

    def step_indices(self) -> list[range]:
        """The global sample indices of this rank's micro-batches for the next step."""
        return rank_microbatches(self.consumed_samples, self.global_batch, self.micro_batch, self.dp_size, self.dp_rank)

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> list[np.ndarray]:
        batches = [self.dataset.batch(r) for r in self.step_indices()]
        self.consumed_samples += self.global_batch
        return batches

    def state_dict(self) -> dict[str, Any]:
        """``{"consumed_samples": int, "dataset": fingerprint}``: plain values, for any checkpoint format."""
        return {"consumed_samples": self.consumed_samples, "dataset": self.dataset.fingerprint()}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Continue from a saved position; with ``strict``, refuse a position saved over other data."""
        consumed = state["consumed_samples"]
        if not isinstance(consumed, int) or consumed < 0:
            raise DataError(f"consumed_samples={consumed!r} must be a non-negative int")
        saved = state.get("dataset")
        if strict and saved is not None and saved != self.dataset.fingerprint():
            raise DataError(
                f"the saved data position is for dataset {saved}, this run reads {self.dataset.fingerprint()} "
                "(other data, seq_len or seed); pass strict=False to continue at the same sample count anyway"
            )
        self.consumed_samples = consumed

"""Named RNG states for dropout under tensor parallelism.

Two kinds of regions need two kinds of randomness:

- *replicated* activations (the full hidden state between blocks when sequence parallelism is off)
  must get the **same** dropout mask on every TP rank, or the replicas drift apart: they use the
  default generator, seeded identically on every TP rank;
- *sharded* activations (attention probabilities of this rank's heads, the sequence shard under SP)
  must get **different** masks per rank, or the shards are correlated: they run inside
  ``tracker.fork()``, which swaps in the ``"model-parallel"`` state, seeded per TP rank.

The tracker is an ordinary object the model holds (no module globals). ``get_states`` /
``set_states`` snapshot it, which is what :func:`tp_layers.recompute` uses so that a recomputed
forward draws the same masks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from .errors import TensorParallelError

MODEL_PARALLEL = "model-parallel"
"""The name of the per-TP-rank state that :func:`seed_tensor_parallel` creates."""

MODEL_PARALLEL_SEED_OFFSET = 2718
"""``seed + 2718 + tp_rank`` seeds the model-parallel state (the offset Megatron-LM uses, so that seeds
carry over)."""


class RNGTracker:
    """Named generator states for one device's default generator; :meth:`fork` runs code under one."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._get, self._set = _default_generator_io(self.device)
        self._states: dict[str, torch.Tensor] = {}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._states)

    def add(self, name: str, seed: int) -> None:
        """Create state ``name`` from ``seed``, without touching the default generator."""
        if name in self._states:
            raise TensorParallelError(f"RNGTracker: state {name!r} already exists")
        self._states[name] = torch.Generator(self.device).manual_seed(seed).get_state()

    @contextmanager
    def fork(self, name: str = MODEL_PARALLEL) -> Iterator[None]:
        """Run the body with the default generator of ``device`` in state ``name``; afterwards the state
        ``name`` has advanced and the default generator is back where it was."""
        if name not in self._states:
            raise TensorParallelError(f"RNGTracker: no state named {name!r} (have {list(self._states)})")
        outside = self._get()
        self._set(self._states[name])
        try:
            yield
        finally:
            self._states[name] = self._get()
            self._set(outside)

    def get_states(self) -> dict[str, torch.Tensor]:
        """A copy of every named state."""
        return {name: state.clone() for name, state in self._states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        """Replace every named state (from :meth:`get_states`)."""
        self._states = {name: state.clone() for name, state in states.items()}


def seed_tensor_parallel(seed: int, *, tp_rank: int, device: torch.device | str = "cpu") -> RNGTracker:
    """Seed the default generators with ``seed`` (``torch.manual_seed``: the same on every TP rank) and
    return a tracker whose ``"model-parallel"`` state is seeded with ``seed + 2718 + tp_rank``.

    Callers that also want different streams across pipeline stages or data-parallel ranks add those
    offsets to ``seed`` themselves.
    """
    torch.manual_seed(seed)
    tracker = RNGTracker(device)
    tracker.add(MODEL_PARALLEL, seed + MODEL_PARALLEL_SEED_OFFSET + tp_rank)
    return tracker


def _default_generator_io(
    device: torch.device,
) -> tuple[Callable[[], torch.Tensor], Callable[[torch.Tensor], None]]:
    """Get and set the state of ``device``'s default generator."""
    if device.type == "cpu":
        return torch.get_rng_state, torch.set_rng_state
    module = torch.get_device_module(device.type)
    index = device.index if device.index is not None else module.current_device()
    return (lambda: module.get_rng_state(index)), (lambda state: module.set_rng_state(state, index))

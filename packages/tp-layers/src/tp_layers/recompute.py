"""Activation recomputation that draws the same random numbers the second time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.utils.checkpoint

from .rng import RNGTracker


def recompute(function: Callable[..., Any], *args: Any, tracker: RNGTracker | None = None, **kwargs: Any) -> Any:
    """``function(*args, **kwargs)`` without keeping its activations: they are recomputed in backward.

    PyTorch's non-reentrant checkpoint restores the default CPU and device generators for the
    recomputation; this also restores the named states of ``tracker`` to what they were when the
    forward ran (and puts back their current states afterwards), so dropout under ``tracker.fork()``
    draws the same masks in the recomputation as in the forward.
    """
    if tracker is None:
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)
    at_forward = tracker.get_states()
    first_run = [True]

    def run(*inner_args: Any, **inner_kwargs: Any) -> Any:
        if first_run[0]:
            first_run[0] = False
            return function(*inner_args, **inner_kwargs)
        now = tracker.get_states()
        tracker.set_states(at_forward)
        try:
            return function(*inner_args, **inner_kwargs)
        finally:
            tracker.set_states(now)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

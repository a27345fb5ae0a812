"""Single-tensor collectives under one name on every supported torch release.

torch 2.13 renamed ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` to ``all_gather_single`` /
``reduce_scatter_single`` (the old names warn); packages declare ``torch>=2.4``, which has only the old
ones. Every package that needs them takes them from here; :func:`reduce_scatter_in_place` is the gloo
variant ``pstate.comm.reduce_scatter(scratch_input=True)`` uses.
"""

from typing import Any

import torch
import torch.distributed as dist

all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

IN_PLACE_REDUCE_SCATTER = "pstate::reduce_scatter_in_place"
"""The profiler label around the all-reduce of a gloo reduce-scatter run in place (``scratch_input``)."""


class _CopyOutWork:
    """The work of an in-place all-reduce standing for a reduce-scatter: ``wait()`` also copies this
    rank's piece out of the summed input."""

    def __init__(self, work: Any, piece: torch.Tensor, output: torch.Tensor) -> None:
        self._work, self._piece, self._output = work, piece, output

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        result = self._work.wait(*args, **kwargs)
        if self._piece is not None:
            self._output.copy_(self._piece)
            self._piece = None
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


def reduce_scatter_in_place(
    output: torch.Tensor, input: torch.Tensor, *, group: dist.ProcessGroup | None, async_op: bool
) -> Any:
    """Gloo's reduce-scatter of a scratch ``input``: an in-place all-reduce of ``input`` and a copy of this
    rank's piece into ``output`` (gloo's own reduce-scatter copies the whole input first)."""
    n = output.numel()
    piece = input.view(-1)[dist.get_rank(group) * n : (dist.get_rank(group) + 1) * n].view(output.shape)
    with torch.profiler.record_function(IN_PLACE_REDUCE_SCATTER):  # names the all-reduce in a profile
        work = dist.all_reduce(input, group=group, async_op=async_op)
    if async_op:
        return _CopyOutWork(work, piece, output)
    output.copy_(piece)
    return None


__all__ = ["IN_PLACE_REDUCE_SCATTER", "all_gather_single", "reduce_scatter_in_place", "reduce_scatter_single"]

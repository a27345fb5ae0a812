"""Simulated communication for dry runs: collectives that do not communicate but fill their outputs.

PyTorch's ``fake`` backend returns from every collective without writing its output, so received
buffers hold whatever memory held: a step run on it goes non-finite or sizes tensors from garbage. While
:func:`simulate` is active, the functions of :mod:`pstate.comm` do not call ``torch.distributed`` at all;
each fills its output deterministically from this rank's input, as if every rank of the group held the
same tensor and the reduction were an average:

- ``all_reduce`` and ``broadcast``: the tensor is left as it is;
- ``all_gather``: this rank's input repeated once per group rank;
- ``reduce_scatter``: this rank's piece of its own input;
- ``all_to_all``: every piece of the output is this rank's own piece of the input (zeros where uneven
  split sizes disagree: MoE routing, whose sizes the simulated count exchange makes those of a world
  where every rank routes like this one);
- ``recv`` (alone or in ``batch_isend_irecv``): zeros; ``send``: nothing.

The records are what the same calls would record on a real run, so one step under a recorder gives the
collectives it issues per axis with their bytes. Meta tensors pass through unchanged (shapes only).
Asynchronous calls return a work object that is already complete.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.distributed as dist


class Simulation:
    """The process-wide switch (a stack, so nesting restores the outer state); see :func:`simulate`."""

    active: ClassVar[list[bool]] = []


@contextmanager
def simulate() -> Iterator[None]:
    """While active, :mod:`pstate.comm`'s collectives fill their outputs instead of communicating."""
    Simulation.active.append(True)
    try:
        yield
    finally:
        Simulation.active.pop()


def simulating() -> bool:
    """Whether :func:`simulate` is active."""
    return bool(Simulation.active)


class DoneWork:
    """The work object of a simulated asynchronous call: complete from the start."""

    def wait(self, *args: Any, **kwargs: Any) -> bool:
        return True

    def is_completed(self) -> bool:
        return True

    def is_success(self) -> bool:
        return True

    def exception(self) -> None:
        return None

    def get_future(self) -> torch.futures.Future:
        future: torch.futures.Future = torch.futures.Future()
        future.set_result(None)
        return future


def _rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1)


def fill_all_gather(output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    """``output`` <- ``input`` repeated once per rank of ``group`` (concatenated along dimension 0)."""
    _, size = _rank_and_size(group)
    with torch.no_grad():
        output.copy_(_flat(input).repeat(size).view(output.shape))


def fill_reduce_scatter(output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    """``output`` <- this rank's equal piece of its own ``input``."""
    rank, _ = _rank_and_size(group)
    n = output.numel()
    with torch.no_grad():
        output.copy_(_flat(input)[rank * n : (rank + 1) * n].view(output.shape))


def fill_all_to_all(
    output: torch.Tensor,
    input: torch.Tensor,
    output_splits: list[int] | None,
    input_splits: list[int] | None,
    group: dist.ProcessGroup | None,
) -> None:
    """Each peer sends what this rank sends itself (every rank holds the same tensor): every piece of
    ``output`` (along dimension 0) <- this rank's own piece of ``input``, where their sizes agree; zeros
    where they do not (uneven splits sized by data the peers would hold differently)."""
    rank, size = _rank_and_size(group)
    rows_in = input.size(0) if input.dim() else 0
    ins = list(input_splits) if input_splits else [rows_in // size] * size
    outs = list(output_splits) if output_splits else [output.size(0) // size] * size if output.dim() else []
    with torch.no_grad():
        if not outs:
            output.zero_()
            return
        own = input.narrow(0, sum(ins[:rank]), ins[rank])
        start = 0
        for rows in outs:
            piece = output.narrow(0, start, rows)
            piece.copy_(own) if rows == ins[rank] else piece.zero_()
            start += rows


def fill_list(tensors: list[torch.Tensor], input: torch.Tensor) -> None:
    """``all_gather`` into a list: every tensor <- ``input``."""
    with torch.no_grad():
        for t in tensors:
            t.copy_(input)


def fill_recv(tensor: torch.Tensor) -> None:
    """A received tensor: zeros."""
    with torch.no_grad():
        tensor.zero_()


__all__ = [
    "DoneWork",
    "Simulation",
    "fill_all_gather",
    "fill_all_to_all",
    "fill_list",
    "fill_recv",
    "fill_reduce_scatter",
    "simulate",
    "simulating",
]

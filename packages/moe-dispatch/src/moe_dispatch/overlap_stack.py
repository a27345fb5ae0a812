"""``StagedStack``: a sequence of blocks that runs whole (``forward``) or cut at its all-to-alls.

A block with a ``stages()`` method (an :class:`~moe_dispatch.MoELayer`, or a model's transformer layer
built around one) is cut where it says; any other module becomes one compute piece. The pieces act on
the last value of the tuple and pass the others through, as :mod:`moe_dispatch.staged_layer` does.

``staged_run()`` is the protocol a pipeline executor looks for (``pp_sched.PipelineExecutor`` with
``overlap=True``): an object whose ``forward(*inputs)`` and ``backward(outputs, grads)`` are generators
of steps (see :mod:`moe_dispatch.overlap`), so that the executor can interleave a paired forward and
backward of two microbatches.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .layer import MoELayer
from .overlap import Compute, OverlapTimes, Stage, StagedRun, Tensors, chain


def _whole(module: nn.Module) -> Compute:
    def fn(values: Tensors) -> Tensors:
        return (*values[:-1], module(values[-1]))

    return Compute(fn, type(module).__name__)


class ResidualMoE(nn.Module):
    """``x + moe(norm(x))``: a pre-norm residual MoE sublayer (a transformer layer's MLP half), cut at the
    MoE layer's all-to-alls. ``norm`` defaults to a ``LayerNorm`` over the layer's hidden size."""

    def __init__(self, moe: MoELayer, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(moe.hidden) if norm is None else norm
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.moe(self.norm(x))

    def stages(self) -> list[Stage]:
        """``(*carry, x) -> (*carry, x + moe(norm(x)))``, cut at the all-to-alls."""
        return chain(
            Compute(lambda v: (*v, self.norm(v[-1])), "norm"),
            self.moe.stages(),
            Compute(lambda v: (*v[:-2], v[-2] + v[-1]), "residual"),
        )


class StagedStack(nn.Module):
    """``blocks`` applied in order to one tensor. ``times``: where :meth:`staged_run` adds its seconds."""

    def __init__(self, blocks: Iterable[nn.Module], times: OverlapTimes | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.times = times

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def stages(self) -> list[Stage]:
        """Fresh pieces of every block for one microbatch, neighbouring compute merged."""
        return chain(*(block.stages() if hasattr(block, "stages") else [_whole(block)] for block in self.blocks))

    def staged_run(self) -> StagedRun:
        """A :class:`StagedRun` of one microbatch through the stack."""
        return StagedRun(self.stages(), self.times)

"""``ColumnParallelLinear`` and ``RowParallelLinear``: ``nn.Linear`` split over a tensor-parallel group.

Weights keep ``nn.Linear``'s ``[out, in]`` shape. Column-parallel rank ``r`` holds weight rows
``[r*out/tp, (r+1)*out/tp)`` (and that slice of the bias); row-parallel rank ``r`` holds that slice of
the columns, and the full bias, added once after the partial outputs are summed. See :mod:`.init` for
how both are initialised so that ``tp=N`` holds the slices of the ``tp=1`` weights.

Both layers take an optional *local matmul*: a callable that replaces this rank's ``F.linear`` (an fp8
matmul, for instance) while the layer keeps its communication around it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pstate import Group

from . import comm, init
from .errors import TensorParallelError
from .linear_fn import column_parallel_linear, row_parallel_linear
from .mappings import (
    copy_to_region,
    gather_from_region,
    gather_sequence_unchecked,
    reduce_from_region,
    reduce_scatter_to_sequence_region,
    scatter_to_region,
)
from .params import mark_sequence_parallel, mark_tensor_parallel

LocalMatmul = Callable[[torch.Tensor], torch.Tensor]
"""This rank's matmul: called with the layer's local input, returns what ``F.linear`` of that input with
the layer's local weight would (and its bias: the column layer's, none for the row layer, whose bias is
added once after the sum), differentiable to the input and to the layer's own parameters."""


class _LocalMatmulMixin:
    local_matmul: LocalMatmul | None

    def set_local_matmul(self, matmul: LocalMatmul | None) -> None:
        """Run ``matmul`` (see :data:`LocalMatmul`) in place of this rank's ``F.linear``, inside the layer's
        communication; ``None`` restores the built-in one. A module given here is not registered as a
        submodule: it must compute with this layer's parameters, which keep their names."""
        object.__setattr__(self, "local_matmul", matmul)


class ColumnParallelLinear(_LocalMatmulMixin, nn.Module):
    """A linear layer split by output features: ``[..., in] -> [..., out/tp]`` on each rank.

    Args:
        in_features, out_features: the sizes of the full layer; ``out_features`` must divide by the group size.
        group: the tensor-parallel group (a ``pstate`` axis or a process group).
        bias: whether to add a bias (split like the output).
        gather_output: all-gather the output to ``[..., out]`` on every rank.
        sequence_parallel: the input is ``[seq/tp, batch, in]`` and is all-gathered along dimension 0.
        keep_gathered_input: under sequence parallelism, keep the gathered input for backward instead of
            gathering it again there (``tp`` times the shard's memory for one all-gather fewer).
        local_matmul: replaces this rank's ``F.linear(x, weight, bias)`` (see :data:`LocalMatmul`); the
            input is then gathered (or entered) with the sequence-parallel mappings around it.
        init_method: fills the full weight (default: ``nn.Linear``'s); see :mod:`tp_layers.init`.
        bias_init: fills the full bias (default: ``nn.Linear``'s uniform, bound ``1/sqrt(in)``).
        seed: draw the full weight and bias from a generator seeded with this (default: the CPU generator).
        full_weight, full_bias: use these full tensors instead of drawing; each rank keeps its slice.
        dtype, device: of the parameters.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        group: Group,
        bias: bool = True,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        keep_gathered_input: bool = False,
        local_matmul: LocalMatmul | None = None,
        init_method: init.InitMethod = init.linear_init,
        bias_init: init.InitMethod | None = None,
        seed: int | None = None,
        full_weight: torch.Tensor | None = None,
        full_bias: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.group, self.tp, rank = group, comm.size_of(group), comm.rank_in(group)
        _check_split("ColumnParallelLinear", "out_features", out_features, self.tp)
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        self.keep_gathered_input = keep_gathered_input
        self.set_local_matmul(local_matmul)
        weight, bias_full = _full_params(
            "ColumnParallelLinear",
            in_features,
            out_features,
            bias,
            init_method,
            bias_init,
            seed,
            full_weight,
            full_bias,
        )
        self.weight = _param(init.shard(weight, 0, rank, self.tp), dtype, device)
        mark_tensor_parallel(self.weight, 0)
        self.bias = None
        if bias_full is not None:
            self.bias = mark_tensor_parallel(_param(init.shard(bias_full, 0, rank, self.tp), dtype, device), 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.local_matmul is None:
            out = column_parallel_linear(
                x,
                self.weight,
                self.bias,
                group=self.group,
                sequence_parallel=self.sequence_parallel,
                keep_gathered_input=self.keep_gathered_input,
            )
        else:
            if self.sequence_parallel:
                x = gather_sequence_unchecked(x, group=self.group)
            else:
                x = copy_to_region(x, group=self.group)
            out = self.local_matmul(x)
        return gather_from_region(out, group=self.group) if self.gather_output else out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features} (per rank {self.weight.size(0)}), "
            f"tp={self.tp}, bias={self.bias is not None}, gather_output={self.gather_output}, "
            f"sequence_parallel={self.sequence_parallel}"
        )


class RowParallelLinear(_LocalMatmulMixin, nn.Module):
    """A linear layer split by input features: ``[..., in/tp] -> [..., out]``, partial outputs summed.

    Args:
        in_features, out_features: the sizes of the full layer; ``in_features`` must divide by the group size.
        group: the tensor-parallel group (a ``pstate`` axis or a process group).
        bias: whether to add a bias (full on every rank, added once after the reduction).
        input_is_parallel: the input is already split along its last dimension (the output of a
            :class:`ColumnParallelLinear`); otherwise it is full and each rank keeps its slice.
        sequence_parallel: reduce-scatter the output along dimension 0 to ``[seq/tp, batch, out]`` instead
            of all-reducing it; the bias is then tagged sequence parallel (its gradient is a partial sum).
        local_matmul: replaces this rank's ``F.linear(x, weight)`` (see :data:`LocalMatmul`; no bias).
        init_method, bias_init, seed, full_weight, full_bias, dtype, device: as for :class:`ColumnParallelLinear`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        group: Group,
        bias: bool = True,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        local_matmul: LocalMatmul | None = None,
        init_method: init.InitMethod = init.linear_init,
        bias_init: init.InitMethod | None = None,
        seed: int | None = None,
        full_weight: torch.Tensor | None = None,
        full_bias: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise TensorParallelError("RowParallelLinear: sequence_parallel=True needs input_is_parallel=True")
        self.group, self.tp, rank = group, comm.size_of(group), comm.rank_in(group)
        _check_split("RowParallelLinear", "in_features", in_features, self.tp)
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        self.set_local_matmul(local_matmul)
        weight, bias_full = _full_params(
            "RowParallelLinear", in_features, out_features, bias, init_method, bias_init, seed, full_weight, full_bias
        )
        self.weight = mark_tensor_parallel(_param(init.shard(weight, 1, rank, self.tp), dtype, device), 1)
        self.bias = None if bias_full is None else _param(bias_full, dtype, device)
        if self.bias is not None and sequence_parallel:
            mark_sequence_parallel(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_region(x, group=self.group)
        if self.local_matmul is None:
            out = row_parallel_linear(x, self.weight, group=self.group, sequence_parallel=self.sequence_parallel)
        elif self.sequence_parallel:
            out = reduce_scatter_to_sequence_region(self.local_matmul(x), group=self.group)
        else:
            out = reduce_from_region(self.local_matmul(x), group=self.group)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features} (per rank {self.weight.size(1)}), out_features={self.out_features}, "
            f"tp={self.tp}, bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}, "
            f"sequence_parallel={self.sequence_parallel}"
        )


def _check_split(layer: str, field: str, value: int, tp: int) -> None:
    if value % tp:
        raise TensorParallelError(f"{layer}: {field}={value} does not divide over tp={tp} ranks")


def _full_params(
    layer: str,
    in_features: int,
    out_features: int,
    bias: bool,
    init_method: init.InitMethod,
    bias_init: init.InitMethod | None,
    seed: int | None,
    full_weight: torch.Tensor | None,
    full_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The full weight and bias: given, or drawn in ``nn.Linear``'s order (weight, then bias)."""
    generator = init.generator_for(seed)
    if full_weight is not None:
        _check_shape(layer, "full_weight", full_weight, (out_features, in_features))
        weight = full_weight.detach().to(init.host(full_weight), torch.float32)
    else:
        weight = init.draw((out_features, in_features), init_method, generator)
    if not bias:
        if full_bias is not None:
            raise TensorParallelError(f"{layer}: full_bias given but bias=False")
        return weight, None
    if full_bias is not None:
        _check_shape(layer, "full_bias", full_bias, (out_features,))
        return weight, full_bias.detach().to(init.host(full_bias), torch.float32)
    if bias_init is None:
        return weight, init.linear_bias(in_features, out_features, generator)
    return weight, init.draw((out_features,), bias_init, generator)


def _check_shape(layer: str, name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise TensorParallelError(f"{layer}: {name} has shape {tuple(tensor.shape)}, expected {shape}")


def _param(tensor: torch.Tensor, dtype: torch.dtype | None, device: torch.device | str | None) -> nn.Parameter:
    return nn.Parameter(tensor.to(device=device, dtype=dtype or torch.get_default_dtype()))

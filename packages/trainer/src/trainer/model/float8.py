"""fp8 matmuls for the torch backend: torchao's float8 training inside the tensor-parallel linear layers.

``precision="fp8"`` keeps everything of ``bf16`` (fp32 master weights, bf16 autocast elsewhere) and runs
the transformer layers' four linear layers (``qkv``, ``proj``, ``fc1``, ``fc2``) as fp8 matmuls with
per-tensor scales from the current amax (torchao's ``tensorwise`` recipe: inputs and weights in e4m3,
output gradients in e5m2). The embeddings, the output layer and the experts stay bf16.

Each layer keeps its class's parameters and their names (checkpoints are the same as bf16's); its
communication is the tensor-parallel mappings (copy or sequence gather before, reduce or reduce-scatter
after) around one torchao ``Float8Linear`` made by torchao's public ``convert_to_float8_training`` over a
linear layer that shares this layer's weight. Dynamic scaling keeps no state, so a checkpoint holds
nothing fp8-specific. ``torch._scaled_mm`` runs on CPUs too, so this path is tested on CPU.
"""

from __future__ import annotations

from importlib.util import find_spec

import torch
from torch import nn

from tp_layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    copy_to_region,
    gather_from_region,
    gather_from_sequence_region,
    reduce_from_region,
    reduce_scatter_to_sequence_region,
    scatter_to_region,
)

#: the trainer's fp8 recipes that torchao implements, by torchao's recipe name.
TORCHAO_RECIPES = {"current": "tensorwise"}
LAYERS = ("qkv", "proj", "fc1", "fc2")


def torchao_available() -> bool:
    return find_spec("torchao") is not None


def _fp8_linear(weight: nn.Parameter, bias: nn.Parameter | None, recipe: str) -> nn.Module:
    """A torchao ``Float8Linear`` over ``weight`` and ``bias`` (the same parameter objects)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    plain = nn.Linear(weight.size(1), weight.size(0), bias=False, device="meta")
    plain.weight, plain.bias = weight, bias
    holder = convert_to_float8_training(
        nn.Sequential(plain), config=Float8LinearConfig.from_recipe_name(TORCHAO_RECIPES[recipe])
    )
    return holder[0]


def _in_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the autocast dtype of its device when autocast is on there (as ``F.linear`` would be)."""
    kind = x.device.type
    return x.to(torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else x


class Float8ColumnParallelLinear(ColumnParallelLinear):
    """:class:`ColumnParallelLinear` with an fp8 matmul (see the module); built by :func:`to_float8`."""

    fp8: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = gather_from_sequence_region(x, group=self.group)
        else:
            x = copy_to_region(x, group=self.group)
        out = self.fp8(_in_autocast_dtype(x))
        return gather_from_region(out, group=self.group) if self.gather_output else out


class Float8RowParallelLinear(RowParallelLinear):
    """:class:`RowParallelLinear` with an fp8 matmul (see the module); built by :func:`to_float8`."""

    fp8: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_region(x, group=self.group)
        partial = self.fp8(_in_autocast_dtype(x))
        if self.sequence_parallel:
            out = reduce_scatter_to_sequence_region(partial, group=self.group)
        else:
            out = reduce_from_region(partial, group=self.group)
        return out if self.bias is None else out + self.bias


def to_float8(chunks: list[nn.Module], recipe: str = "current") -> int:
    """Turn the transformer layers' linear layers of ``chunks`` into fp8 ones, in place (the parameters
    stay where and what they are); return how many were converted."""
    count = 0
    for chunk in chunks:
        for name, module in chunk.named_modules():
            if name.rsplit(".", 1)[-1] not in LAYERS or ".experts" in name:
                continue
            if type(module) is ColumnParallelLinear:
                module.__class__ = Float8ColumnParallelLinear
                fp8 = _fp8_linear(module.weight, module.bias, recipe)
            elif type(module) is RowParallelLinear:
                module.__class__ = Float8RowParallelLinear
                fp8 = _fp8_linear(module.weight, None, recipe)  # the bias is added once, after the sum
            else:
                continue
            object.__setattr__(module, "fp8", fp8)  # not a submodule: the parameters keep their one name
            count += 1
    return count

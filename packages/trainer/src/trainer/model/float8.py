"""fp8 matmuls for the torch backend: torchao's float8 training inside the tensor-parallel linear layers.

``precision="fp8"`` keeps everything of ``bf16`` (fp32 master weights, bf16 autocast elsewhere) and runs
the transformer layers' four linear layers (``qkv``, ``proj``, ``fc1``, ``fc2``) as fp8 matmuls with
per-tensor scales from the current amax (torchao's ``tensorwise`` recipe: inputs and weights in e4m3,
output gradients in e5m2). The embeddings, the output layer and the experts stay bf16.

Each layer keeps its class, its parameters and their names (checkpoints are the same as bf16's) and
its tensor-parallel communication: ``tp_layers``' local-matmul hook runs one torchao ``Float8Linear``
(made by torchao's public ``convert_to_float8_training`` over a linear layer that shares this layer's
weight) in place of the layer's own ``F.linear``. Dynamic scaling keeps no state, so a checkpoint holds
nothing fp8-specific. ``torch._scaled_mm`` runs on CPUs too, so this path is tested on CPU.
"""

from __future__ import annotations

from importlib.util import find_spec

import torch
from torch import nn

from tp_layers import ColumnParallelLinear, RowParallelLinear

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


class Float8Matmul:
    """A layer's local matmul in fp8: the input in the autocast dtype of its device when autocast is on
    there (as ``F.linear`` would cast it), then torchao's ``Float8Linear``."""

    def __init__(self, fp8: nn.Module) -> None:
        self.fp8 = fp8

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        kind = x.device.type
        return self.fp8(x.to(torch.get_autocast_dtype(kind)) if torch.is_autocast_enabled(kind) else x)


def to_float8(chunks: list[nn.Module], recipe: str = "current") -> int:
    """Turn the transformer layers' linear layers of ``chunks`` into fp8 ones, in place (the parameters
    stay where and what they are); return how many were converted."""
    count = 0
    for chunk in chunks:
        for name, module in chunk.named_modules():
            if name.rsplit(".", 1)[-1] not in LAYERS or ".experts" in name:
                continue
            if getattr(module, "local_matmul", None) is not None:
                continue  # converted already
            if type(module) is ColumnParallelLinear:
                fp8 = _fp8_linear(module.weight, module.bias, recipe)
            elif type(module) is RowParallelLinear:
                fp8 = _fp8_linear(module.weight, None, recipe)  # the bias is added once, after the sum
            else:
                continue
            module.set_local_matmul(Float8Matmul(fp8))
            count += 1
    return count

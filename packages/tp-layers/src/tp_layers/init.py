"""TP-invariant initialisation: every rank draws the full tensor, then keeps its slice.

A layer's full weight is drawn on the CPU, in float32, from one generator: the ``seed`` given to the
layer (a fresh ``torch.Generator`` seeded with it), or else the default CPU generator, which holds the
same state on every TP rank. Every rank therefore draws the same full weight and keeps its slice, so a
model built at ``tp=N`` holds exactly the slices of the ``tp=1`` model built from the same seed, on any
device. The defaults draw what ``nn.Linear`` and ``nn.Embedding`` draw, in the same order, so a layer
built after ``torch.manual_seed(s)`` equals the plain PyTorch layer built after the same call.

Drawing the full tensor costs one layer's full weight of host memory, once, while the layer is built.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

InitMethod = Callable[[torch.Tensor, "torch.Generator | None"], object]
"""``init_method(tensor, generator)`` fills the full CPU float32 ``tensor`` in place."""


def linear_init(tensor: torch.Tensor, generator: torch.Generator | None) -> None:
    """``nn.Linear``'s default weight initialisation (Kaiming uniform with ``a=sqrt(5)``)."""
    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)


def normal_init(std: float = 0.02) -> InitMethod:
    """Normal with mean 0 and standard deviation ``std`` (GPT-2's choice, and ``nn.Embedding``'s with std=1)."""

    def init(tensor: torch.Tensor, generator: torch.Generator | None) -> None:
        nn.init.normal_(tensor, mean=0.0, std=std, generator=generator)

    return init


def scaled_normal_init(std: float, num_layers: int) -> InitMethod:
    """Normal with ``std / sqrt(2 * num_layers)``: GPT-2's choice for the projections into the residual."""
    return normal_init(std / math.sqrt(2.0 * num_layers))


def generator_for(seed: int | None) -> torch.Generator | None:
    """A CPU generator seeded with ``seed``, or ``None`` (the default CPU generator) when no seed is given."""
    return None if seed is None else torch.Generator().manual_seed(seed)


def host(tensor: torch.Tensor) -> torch.device:
    """Where a given full tensor is sliced: the CPU, or the meta device for a meta tensor (a model built
    from shapes alone, as dry runs do)."""
    return tensor.device if tensor.is_meta else torch.device("cpu")


def draw(shape: tuple[int, ...], init_method: InitMethod, generator: torch.Generator | None) -> torch.Tensor:
    """The full float32 CPU tensor of ``shape`` filled by ``init_method``."""
    full = torch.empty(shape, dtype=torch.float32)
    with torch.no_grad():
        init_method(full, generator)
    return full


def linear_bias(fan_in: int, out_features: int, generator: torch.Generator | None) -> torch.Tensor:
    """``nn.Linear``'s default bias: uniform in ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return torch.empty(out_features).uniform_(-bound, bound, generator=generator)


def shard(full: torch.Tensor, dim: int, rank: int, parts: int) -> torch.Tensor:
    """Slice ``rank`` of ``parts`` equal contiguous slices of ``full`` along ``dim`` (the sizes must divide)."""
    chunk = full.size(dim) // parts
    return full.narrow(dim, rank * chunk, chunk).clone()

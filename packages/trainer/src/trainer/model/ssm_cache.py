"""The inference caches of a hybrid model's non-attention layers (TP=CP=1, as ``KVCache``).

A Mamba-2 layer needs only fixed-size state to continue a sequence: the last ``width - 1`` inputs of its
causal convolution and the SSM state of every head (:class:`SSMCache`). An MLP or MoE layer needs none;
it gets a :class:`PositionCache` that only counts positions, so that every layer of a chunk has a cache
of the common ``length`` (``GPTChunk.kv_caches`` builds one per layer of the right kind).
"""

from __future__ import annotations

import torch

from ..errors import TrainerError


class PositionCache:
    """The number of positions a stateless layer has seen (``length``)."""

    def __init__(self) -> None:
        self.length = 0

    def advance(self, new: int) -> None:
        self.length += new


class SSMCache:
    """One Mamba-2 layer's state for ``batch`` sequences: ``conv`` ``[batch, channels, width - 1]`` (the last
    inputs of the convolution over ``x, B, C``) and ``ssm`` ``[batch, heads, head_dim, state]`` (float32)."""

    def __init__(
        self,
        batch: int,
        channels: int,
        width: int,
        heads: int,
        head_dim: int,
        state: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if min(batch, channels, width, heads, head_dim, state) < 1:
            raise TrainerError(f"SSMCache: batch={batch}, channels={channels}, width={width}, heads={heads}")
        self.conv = torch.zeros(batch, channels, width - 1, dtype=dtype, device=device)
        self.ssm = torch.zeros(batch, heads, head_dim, state, dtype=torch.float32, device=device)
        self.length = 0

    def advance(self, conv: torch.Tensor, ssm: torch.Tensor, new: int) -> None:
        """Keep the states after ``new`` more positions."""
        if conv.shape != self.conv.shape or ssm.shape != self.ssm.shape:
            raise TrainerError(
                f"SSMCache: states of shapes {tuple(conv.shape)}, {tuple(ssm.shape)} given, the cache holds "
                f"{tuple(self.conv.shape)}, {tuple(self.ssm.shape)}"
            )
        self.conv.copy_(conv)
        self.ssm.copy_(ssm)
        self.length += new

"""``KVCache``: one layer's keys and values for incremental decoding (inference at TP=CP=1, no SP).

A cache holds preallocated keys and values ``[batch, kv_heads, max_len, head_dim]`` (rotary already applied)
and ``length``, the number of positions filled. A forward with caches (``GPTChunk.forward(ids, caches)``,
one cache per layer, all of the same length) treats its tokens as positions ``length, length+1, ...``:
learned and rotary positions are absolute, and the new tokens attend causally to each other and to every
cached position. The prompt goes in one call (prefill), then one token per call. Nothing is kept anywhere
but in the caches the caller passes; the training forward takes none.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import TrainerError
from .groups import ModelGroups


class KVCache:
    """Keys and values of up to ``max_len`` positions of one layer, for ``batch`` sequences."""

    def __init__(
        self,
        batch: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if min(batch, kv_heads, max_len, head_dim) < 1:
            raise TrainerError(f"KVCache: batch={batch}, kv_heads={kv_heads}, max_len={max_len}, head_dim={head_dim}")
        self.keys = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.keys.size(2)

    def positions(self, new: int, device: torch.device) -> torch.Tensor:
        """The absolute positions of ``new`` tokens that come after the cached ones."""
        return torch.arange(self.length, self.length + new, device=device)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the new tokens' ``k``, ``v`` after the cached ones and return the attention of ``q`` over
        all of them: causal among the new tokens, full over the cached ones. ``[batch, heads, new, head_dim]``."""
        start, new = self.length, k.size(2)
        end = start + new
        if k.shape[:2] + k.shape[3:] != self.keys.shape[:2] + self.keys.shape[3:]:
            shape = (self.keys.size(0), self.keys.size(1), new, self.keys.size(3))
            raise TrainerError(f"KVCache: keys of shape {tuple(k.shape)} given, the cache takes {shape}")
        if end > self.max_len:
            raise TrainerError(f"KVCache: {start} of {self.max_len} positions are used; {new} more do not fit")
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        self.length = end
        keys, values = self.keys[:, :, :end], self.values[:, :, :end]
        gqa = keys.size(1) != q.size(1)
        if new == 1:  # one new token sees every position
            return F.scaled_dot_product_attention(q, keys, values, enable_gqa=gqa)
        if start == 0:  # prefill: plain causal attention
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible(start, new, q.device), enable_gqa=gqa)


def visible(start: int, new: int, device: torch.device) -> torch.Tensor:
    """``[new, start + new]``: new token ``i`` (position ``start + i``) sees positions ``0..start+i``."""
    return torch.ones(new, start + new, dtype=torch.bool, device=device).tril(start)


def check_caches(caches: Sequence, groups: ModelGroups, layers: int, kind: type | tuple[type, ...] = KVCache) -> int:
    """The common length of a chunk's ``caches`` (the position of its next token); refuses a layout or a
    set of caches that incremental decoding does not support, and caches that are not ``kind``."""
    if groups.tp_size > 1 or groups.cp_size > 1 or groups.sequence_parallel:
        raise TrainerError(
            f"a KV cache runs at tp=cp=1 without sequence parallelism (as generation does); this chunk has "
            f"tp={groups.tp_size}, cp={groups.cp_size}, sequence_parallel={groups.sequence_parallel}"
        )
    if len(caches) != layers:
        raise TrainerError(f"{len(caches)} KV caches given for a chunk of {layers} layers (one per layer)")
    if not all(isinstance(c, kind) for c in caches):
        given = sorted({type(c).__name__ for c in caches})
        kinds = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise TrainerError(f"this model's layers take {kinds} caches (GPTChunk.kv_caches makes them), not {given}")
    lengths = {c.length for c in caches}
    if len(lengths) > 1:
        raise TrainerError(f"the KV caches of one chunk must hold as many positions; they hold {sorted(lengths)}")
    return caches[0].length if caches else 0

"""``LatentCache``: one multi-latent attention layer's cache for incremental decoding (TP=CP=1, no SP).

It stores what MLA compresses a token into, not the per-head keys and values: the normalised latent
``[batch, max_len, kv_lora_rank]`` and the rotary key ``[batch, max_len, qk_rope_head_dim]`` (rotary
applied), ``kv_lora_rank + qk_rope_head_dim`` numbers per token and layer whatever the head count. The
attention runs on the latents directly ("absorbed"): each head's key up-projection is folded into its
query and its value up-projection applied after the softmax, which is the same function as expanding
every cached latent into keys and values. Positions and masking are those of ``KVCache``.
"""

from __future__ import annotations

import torch

from ..errors import TrainerError
from .kv_cache import visible


class LatentCache:
    """Latents and rotary keys of up to ``max_len`` positions of one layer, for ``batch`` sequences."""

    def __init__(
        self,
        batch: int,
        max_len: int,
        kv_lora_rank: int,
        rope_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if min(batch, max_len, kv_lora_rank, rope_dim) < 1:
            raise TrainerError(
                f"LatentCache: batch={batch}, max_len={max_len}, kv_lora_rank={kv_lora_rank}, rope_dim={rope_dim}"
            )
        self.latents = torch.zeros(batch, max_len, kv_lora_rank, dtype=dtype, device=device)
        self.rotary = torch.zeros(batch, max_len, rope_dim, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.latents.size(1)

    def positions(self, new: int, device: torch.device) -> torch.Tensor:
        """The absolute positions of ``new`` tokens that come after the cached ones."""
        return torch.arange(self.length, self.length + new, device=device)

    def attend_latent(
        self,
        q_nope: torch.Tensor,
        q_rot: torch.Tensor,
        latent: torch.Tensor,
        k_rot: torch.Tensor,
        kv_up: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Store the new tokens' ``latent`` ``[batch, new, kv_lora_rank]`` and rotary key ``k_rot``
        ``[batch, new, rope_dim]`` after the cached ones; return the attention of the queries (``q_nope``,
        ``q_rot``: ``[batch, heads, new, *]``) over every position, causal among the new tokens:
        ``[batch, heads, new, v_head_dim]``. ``kv_up``: the layer's ``[heads * (nope + v), kv_lora_rank]``."""
        start, new = self.length, latent.size(1)
        end = start + new
        if latent.shape[::2] != self.latents.shape[::2] or k_rot.shape[::2] != self.rotary.shape[::2]:
            shape = (self.latents.size(0), new, self.latents.size(2))
            raise TrainerError(f"LatentCache: latents of shape {tuple(latent.shape)} given, the cache takes {shape}")
        if end > self.max_len:
            raise TrainerError(f"LatentCache: {start} of {self.max_len} positions are used; {new} more do not fit")
        self.latents[:, start:end] = latent
        self.rotary[:, start:end] = k_rot
        self.length = end
        mask = visible(start, new, q_nope.device)
        return absorbed_attention(q_nope, q_rot, self.latents[:, :end], self.rotary[:, :end], kv_up, scale, mask)


def absorbed_attention(
    q_nope: torch.Tensor,
    q_rot: torch.Tensor,
    latents: torch.Tensor,
    rotary: torch.Tensor,
    kv_up: torch.Tensor,
    scale: float,
    mask: torch.Tensor,
) -> torch.Tensor:
    """MLA over cached latents: queries ``[batch, heads, new, *]``, ``latents`` ``[batch, length, rank]``
    and ``rotary`` ``[batch, length, rope_dim]``, ``mask`` (``True``: seen) broadcast to ``[batch, heads,
    new, length]``. Returns ``[batch, heads, new, v_head_dim]``."""
    heads, nope = q_nope.size(1), q_nope.size(-1)
    up = kv_up.reshape(heads, -1, kv_up.size(-1))  # [heads, nope + v, kv_lora_rank]
    q_latent = torch.einsum("bhnd,hdr->bhnr", q_nope, up[:, :nope])
    scores = torch.einsum("bhnr,blr->bhnl", q_latent, latents) + torch.einsum("bhnd,bld->bhnl", q_rot, rotary)
    scores = (scores * scale).masked_fill(~mask, float("-inf"))
    probs = scores.float().softmax(-1).to(latents.dtype)
    return torch.einsum("bhnr,hvr->bhnv", torch.einsum("bhnl,blr->bhnr", probs, latents), up[:, nope:])

"""A paged KV cache: every layer's keys and values in fixed-size blocks from one bounded pool.

A sequence owns a *block table*, the list of its blocks in position order; position ``p`` lives in slot
``table[p // block_size] * block_size + p % block_size``, in every layer (one table serves all layers).
The pool holds ``[num_blocks * block_size, kv_heads, head_dim]`` keys and values per layer and a free
list; it never grows, so the scheduler queues or preempts when it is empty. For multi-latent attention
(``latent=True``) a slot holds one ``[kv_lora_rank + qk_rope_head_dim]`` latent and rotary key instead
(``keys`` only, one "head"; TP ranks each hold it whole, as the latent is not split over heads).

:class:`PagedBatch` is one model step over many sequences packed into one row of tokens (batch 1, no
padding): each *segment* is the next ``n`` tokens of one sequence, at positions ``start .. start+n-1``.
It gives each layer a :class:`PagedLayer`, which the attention layer uses as it uses a ``KVCache``
(``positions`` for the rotary angles, ``attend`` to store the new keys and attend over the sequence's
blocks); the segments never see each other. Attention gathers each sequence's blocks into plain SDPA:
the one-token segments (decoding) in one padded call, each longer segment (a prefill chunk) in its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import TrainerError
from ..model.kv_cache import visible
from ..model.mla_cache import absorbed_attention


class BlockPool:
    """``num_blocks`` blocks of ``block_size`` positions for each of ``layers`` layers."""

    def __init__(
        self,
        *,
        layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        latent: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if min(layers, num_blocks, block_size, kv_heads, head_dim) < 1:
            raise TrainerError(f"BlockPool: num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks * block_size, kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [] if latent else [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    def blocks_for(self, positions: int) -> int:
        """How many blocks hold ``positions`` positions."""
        return -(-positions // self.block_size)

    def grow(self, table: list[int], positions: int) -> bool:
        """Extend ``table`` to hold ``positions`` positions; ``False`` (and no change) if the pool is short."""
        need = self.blocks_for(positions) - len(table)
        if need > len(self._free):
            return False
        for _ in range(max(need, 0)):
            table.append(self._free.pop())
        return True

    def release(self, table: list[int]) -> None:
        """Give ``table``'s blocks back and empty it."""
        self._free.extend(reversed(table))
        table.clear()


@dataclass(frozen=True)
class Segment:
    """The next ``len(ids)`` tokens of one sequence, at positions ``start ..``, whose blocks are ``table``."""

    ids: list[int]
    start: int
    table: list[int]


class PagedBatch:
    """One packed step: the tokens of ``segments`` in one row, their positions, and their slots."""

    def __init__(self, segments: Sequence[Segment], pool: BlockPool, device: torch.device) -> None:
        bs = pool.block_size
        self.pool, self.device = pool, device
        self.ids = torch.tensor([[t for s in segments for t in s.ids]], dtype=torch.long, device=device)
        positions, self.ends, offsets = [], [], [0]
        for s in segments:
            positions.extend(range(s.start, s.start + len(s.ids)))
            self.ends.append(offsets[-1] + len(s.ids))
            offsets.append(self.ends[-1])
        self.position_list = positions
        self._positions = torch.tensor(positions, dtype=torch.long, device=device)
        slots = [s.table[p // bs] * bs + p % bs for s in segments for p in range(s.start, s.start + len(s.ids))]
        self.slots = torch.tensor(slots, dtype=torch.long, device=device)
        self.segments, self.offsets = list(segments), offsets[:-1]
        decode = [i for i, s in enumerate(segments) if len(s.ids) == 1]
        self.decode_rows = torch.tensor([self.offsets[i] for i in decode], dtype=torch.long, device=device)
        self.prefill = [i for i, s in enumerate(segments) if len(s.ids) > 1]
        self.decode_keys = self.decode_mask = None
        if decode:  # [rows, longest context] slot indices, padded with slot 0 and masked out
            lengths = [segments[i].start + 1 for i in decode]
            longest = max(lengths)
            index = torch.zeros(len(decode), longest, dtype=torch.long)
            for row, i in enumerate(decode):
                index[row, : lengths[row]] = _context_slots(segments[i], lengths[row], bs)
            self.decode_keys = index.to(device)
            self.decode_mask = (torch.arange(longest) < torch.tensor(lengths).unsqueeze(1)).to(device)
        self.prefill_keys = [
            _context_slots(segments[i], segments[i].start + len(segments[i].ids), bs).to(device) for i in self.prefill
        ]

    def positions(self) -> torch.Tensor:
        """The absolute position of every packed token, ``[tokens]``."""
        return self._positions

    def layer(self, index: int) -> PagedLayer:
        """The cache object layer ``index`` is given for this step."""
        return PagedLayer(self, index)


def _context_slots(segment: Segment, length: int, block_size: int) -> torch.Tensor:
    """The slots of positions ``0 .. length-1`` of ``segment``'s sequence."""
    blocks = torch.tensor(segment.table[: -(-length // block_size)], dtype=torch.long)
    slots = (blocks.unsqueeze(1) * block_size + torch.arange(block_size)).flatten()
    return slots[:length]


class PagedLayer:
    """What one attention layer sees of a :class:`PagedBatch` (the ``KVCache`` interface it calls)."""

    def __init__(self, batch: PagedBatch, index: int) -> None:
        self.batch, self.index = batch, index

    def positions(self, new: int, device: torch.device) -> torch.Tensor:
        if new != self.batch.slots.numel():
            raise TrainerError(f"PagedLayer: {new} tokens given, the step packs {self.batch.slots.numel()}")
        return self.batch.positions()

    def attend_latent(
        self,
        q_nope: torch.Tensor,
        q_rot: torch.Tensor,
        latent: torch.Tensor,
        k_rot: torch.Tensor,
        kv_up: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """Multi-latent attention (``LatentCache``'s interface, batch 1): store each token's latent and
        rotary key in its slot and attend over its own sequence's, ``[1, heads, tokens, v_head_dim]``."""
        b, rank = self.batch, latent.size(-1)
        pool = b.pool.keys[self.index]
        pool[b.slots, 0] = torch.cat([latent[0], k_rot[0]], dim=-1).to(pool.dtype)
        out = q_nope.new_empty(*q_nope.shape[:3], kv_up.size(0) // q_nope.size(1) - q_nope.size(-1))

        def attend(q: tuple[torch.Tensor, torch.Tensor], slots: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            cached = pool[slots, 0].to(q[0].dtype)  # [..., length, rank + rope]
            return absorbed_attention(*q, cached[..., :rank], cached[..., rank:], kv_up, scale, mask)

        if b.decode_keys is not None:
            rows = b.decode_rows
            q = tuple(t[0, :, rows].transpose(0, 1).unsqueeze(2) for t in (q_nope, q_rot))  # [n, heads, 1, d]
            att = attend(q, b.decode_keys, b.decode_mask[:, None, None, :])
            out[0, :, rows] = att.squeeze(2).transpose(0, 1)
        for i, slots in zip(b.prefill, b.prefill_keys):
            seg, lo = b.segments[i], b.offsets[i]
            hi = lo + len(seg.ids)
            q = (q_nope[:, :, lo:hi], q_rot[:, :, lo:hi])
            out[:, :, lo:hi] = attend(q, slots.unsqueeze(0), visible(seg.start, hi - lo, q_nope.device))
        return out

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store ``k``, ``v`` (``[1, kv_heads, tokens, head_dim]``) in their slots and return each token's
        attention over its own sequence up to itself, ``[1, heads, tokens, head_dim]``."""
        b = self.batch
        keys, values = b.pool.keys[self.index], b.pool.values[self.index]
        keys[b.slots] = k[0].transpose(0, 1).to(keys.dtype)
        values[b.slots] = v[0].transpose(0, 1).to(values.dtype)
        out = torch.empty_like(q)
        gqa = k.size(1) != q.size(1)
        if b.decode_keys is not None:
            rows = b.decode_rows
            qd = q[0, :, rows].transpose(0, 1).unsqueeze(2)  # [n, heads, 1, d]
            kd, vd = keys[b.decode_keys].transpose(1, 2), values[b.decode_keys].transpose(1, 2)  # [n, kv, L, d]
            mask = b.decode_mask[:, None, None, :]
            att = F.scaled_dot_product_attention(qd, kd.to(q.dtype), vd.to(q.dtype), attn_mask=mask, enable_gqa=gqa)
            out[0, :, rows] = att.squeeze(2).transpose(0, 1)
        for i, slots in zip(b.prefill, b.prefill_keys):
            seg, lo = b.segments[i], b.offsets[i]
            hi, start = lo + len(seg.ids), seg.start
            qs = q[:, :, lo:hi]
            ks = keys[slots].transpose(0, 1).unsqueeze(0).to(q.dtype)
            vs = values[slots].transpose(0, 1).unsqueeze(0).to(q.dtype)
            if start == 0:
                att = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
            else:  # new token j sees positions 0 .. start + j
                mask = torch.ones(hi - lo, start + hi - lo, dtype=torch.bool, device=q.device).tril(start)
                att = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=gqa)
            out[:, :, lo:hi] = att
        return out

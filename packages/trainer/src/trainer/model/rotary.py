"""Rotary position embedding (the rotate-half form used by GPT-NeoX and Llama), with the frequency
scalings of Hugging Face's ``rope_type`` ``"linear"`` and ``"llama3"``, and DeepSeek's interleaved
pairs (``interleaved``: dimensions ``2i`` and ``2i+1`` turn together; they are moved into the two halves
first, so the output is in the rotate-half order, the same for queries and keys)."""

from __future__ import annotations

import math

import torch

from .config import ModelConfig


def inverse_frequencies(cfg: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    """The ``rotary_dim/2`` rotation frequencies (float32) of ``cfg``'s rotary embedding.

    ``"linear"`` divides every frequency by ``rope_factor``. ``"llama3"`` divides the low frequencies
    (wavelength above ``rope_original_max_len / rope_low_freq_factor``) by ``rope_factor``, keeps the
    high ones (wavelength below ``rope_original_max_len / rope_high_freq_factor``) and blends the ones
    between linearly in ``rope_original_max_len / wavelength``.
    """
    dim = cfg.rotary_dim
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, dim, 2, device=device).float() / dim)
    if cfg.rope_type == "linear":
        return inv / cfg.rope_factor
    if cfg.rope_type == "llama3":
        original = cfg.rope_original_max_len or cfg.max_seq_len
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        wavelength = 2 * math.pi / inv
        scaled = torch.where(wavelength > original / low, inv / cfg.rope_factor, inv)
        blend = (original / wavelength - low) / (high - low)
        middle = (wavelength >= original / high) & (wavelength <= original / low)
        return torch.where(middle, (1 - blend) * scaled / cfg.rope_factor + blend * scaled, scaled)
    return inv


def rotary_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of shape ``[*positions.shape, head_dim]`` in float32 for integer ``positions``
    (``[seq]``, or ``[batch, seq]`` when each sequence has its own, as packed documents do)."""
    angles = positions.float().unsqueeze(-1) * inv_freq.to(positions.device)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = False) -> torch.Tensor:
    """Rotate ``x`` of shape ``[batch, heads, seq, dim]`` by the angles of its ``seq`` positions (``cos``, ``sin``:
    ``[seq, dim]``, or ``[batch, 1, seq, dim]`` for per-sequence positions); ``interleaved``: the rotated pairs
    are adjacent dimensions (DeepSeek's layout) instead of the two halves."""
    if interleaved:
        x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
    first, second = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)

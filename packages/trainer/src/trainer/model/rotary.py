"""Rotary position embedding (the rotate-half form used by GPT-NeoX and Llama), with the frequency
scalings of Hugging Face's ``rope_type`` ``"linear"``, ``"llama3"`` and ``"yarn"``, and DeepSeek's interleaved
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
    if cfg.rope_type == "yarn":
        return _yarn(cfg, dim, device)
    return inv


def _yarn(cfg: ModelConfig, dim: int, device: torch.device | None) -> torch.Tensor:
    """YaRN: dimension pairs that turn more than ``rope_beta_fast`` times over the original context keep
    their frequency, those under ``rope_beta_slow`` times are divided by ``rope_factor``, and a linear ramp
    over the pair index (its ends rounded outward) blends the ones between."""
    original = cfg.rope_original_max_len or cfg.max_seq_len

    def pair_of(turns: float) -> float:  # the (fractional) pair index that turns ``turns`` times
        return dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    low = max(math.floor(pair_of(cfg.rope_beta_fast)), 0)
    high = min(math.ceil(pair_of(cfg.rope_beta_slow)), dim - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(dim // 2, device=device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    base = cfg.rope_theta ** (torch.arange(0, dim, 2, device=device).float() / dim)
    return 1.0 / (cfg.rope_factor * base) * ramp + 1.0 / base * (1 - ramp)


def yarn_mscale(cfg: ModelConfig, m: float) -> float:
    """YaRN's ``0.1 * m * ln(rope_factor) + 1`` (1 when ``rope_factor <= 1``)."""
    return 1.0 if cfg.rope_factor <= 1 else 0.1 * m * math.log(cfg.rope_factor) + 1.0


def rotary_scale(cfg: ModelConfig) -> float:
    """The factor on ``cos`` and ``sin`` (so on the rotated parts of queries and keys): YaRN's attention
    factor, ``mscale(rope_mscale) / mscale(rope_mscale_all_dim)`` when both are set, else ``mscale(1)``;
    1 for the other rope types."""
    if cfg.rope_type != "yarn":
        return 1.0
    if cfg.rope_mscale and cfg.rope_mscale_all_dim:
        return yarn_mscale(cfg, cfg.rope_mscale) / yarn_mscale(cfg, cfg.rope_mscale_all_dim)
    return yarn_mscale(cfg, 1.0)


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

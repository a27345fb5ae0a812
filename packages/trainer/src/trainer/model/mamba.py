"""The Mamba-2 mixer split over TP (SSM heads and groups), CP (all-to-all to heads) and SP (its projections).

``in_proj`` maps ``hidden`` to ``z`` (the gate), ``x``, ``B``, ``C`` (per group) and ``dt`` (per head); the
causal depthwise convolution runs over ``x, B, C``; the SSD scan (:mod:`.ssd`) mixes the sequence per
head; ``D`` adds a skip of ``x``; a gated RMSNorm (per group) multiplies by ``silu(z)``; ``out_proj`` maps
back to ``hidden``. The weights and their names follow ``transformers``' ``Mamba2Mixer``.

Tensor parallelism splits heads and groups: ``in_proj`` is column-parallel and holds, on each TP rank,
that rank's rows of each of ``z, x, B, C, dt`` one after the other; the convolution, ``A_log``, ``D``,
``dt_bias`` and the norm hold that rank's channels and heads; ``out_proj`` is row-parallel. Context
parallelism is Megatron's: each CP rank projects its own tokens, an all-to-all
(:func:`cp_ring.all_to_all_sp2hp`) trades the sequence split for a split of this TP rank's heads (CP rank
``c`` gets every position of head slice ``c``), the zigzag-placed positions are put in global order, the
convolution and scan run over the whole sequence with the parameters of those heads, and the inverse
all-to-all brings the output back to the rank's own tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import cp_ring
from pstate.tags import mark_tensor_parallel
from tp_layers import ColumnParallelLinear, RowParallelLinear

from ..errors import TrainerError
from . import init
from .config import ModelConfig
from .groups import ModelGroups
from .pieces import Init, Piece, fused_rows, row_split
from .ssd import causal_conv, ssd_scan
from .ssm_cache import SSMCache

DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 0.1, 1e-4
"""The initial step sizes are log-uniform in ``[DT_MIN, DT_MAX]``, at least ``DT_FLOOR`` (as Mamba-2)."""


def initial_dt_bias(heads: int, seed: int) -> torch.Tensor:
    """``dt_bias`` of all ``heads``: the inverse softplus of step sizes drawn log-uniformly from ``seed``."""
    u = torch.rand(heads, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    dt = torch.exp(u * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)).clamp(min=DT_FLOOR)
    return (dt + torch.log(-torch.expm1(-dt))).float()


class CausalConv(nn.Module):
    """The depthwise convolution's ``weight`` ``[channels, width]`` and ``bias`` ``[channels]``."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels, width))  # drawn per piece (trainer.model.seeded)
        self.bias = nn.Parameter(torch.zeros(channels))


class GatedRMSNorm(nn.Module):
    """``weight * rmsnorm(y * silu(z))``, the mean square taken over each group of ``group_size`` channels."""

    def __init__(self, channels: int, group_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.group_size, self.eps = group_size, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        h = y.float() * F.silu(z.float())
        h = h.unflatten(-1, (-1, self.group_size))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.flatten(-2).to(dtype)


class Mamba2Mixer(nn.Module):
    """The Mamba-2 mixer of global layer ``layer`` on ``[seq, batch, hidden]`` (see the module)."""

    def __init__(self, cfg: ModelConfig, groups: ModelGroups, layer: int) -> None:
        super().__init__()
        tp, cp, sp = groups.tp_size, groups.cp_size, groups.sequence_parallel
        if cfg.mamba_groups % (tp * cp):
            raise TrainerError(f"tp*cp={tp * cp} must divide the model's mamba_groups ({cfg.mamba_groups})")
        self.cfg, self.groups, self.layer = cfg, groups, layer
        self.heads, self.ngroups = cfg.mamba_heads // tp, cfg.mamba_groups // tp
        self.inner, self.bc = self.heads * cfg.mamba_head_dim, self.ngroups * cfg.mamba_state
        self.sizes = {"z": self.inner, "x": self.inner, "B": self.bc, "C": self.bc, "dt": self.heads}
        rows = sum(self.sizes.values()) * tp
        self.in_proj = ColumnParallelLinear(
            cfg.hidden, rows, group=groups.tp, bias=False, sequence_parallel=sp,
            keep_gathered_input=groups.keep_gathered_input, full_weight=init.placeholder((rows, cfg.hidden)),
        )  # fmt: skip
        self.conv = CausalConv(self.inner + 2 * self.bc, cfg.mamba_conv)
        first = groups.tp_rank * self.heads
        self.A_log = nn.Parameter(torch.log(torch.arange(first + 1, first + self.heads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(self.heads))
        self.dt_bias = nn.Parameter(torch.zeros(self.heads))  # drawn by trainer.model.seeded
        self.norm = GatedRMSNorm(self.inner, cfg.mamba_inner // cfg.mamba_groups, cfg.norm_eps)
        for p in (self.conv.weight, self.conv.bias, self.A_log, self.D, self.dt_bias, self.norm.weight):
            mark_tensor_parallel(p, 0)
        self.out_proj = RowParallelLinear(
            self.inner * tp, cfg.hidden, group=groups.tp, bias=False, input_is_parallel=True, sequence_parallel=sp,
            full_weight=init.placeholder((cfg.hidden, self.inner * tp)),
        )  # fmt: skip

    def pieces(self, prefix: str) -> list[Piece]:
        """``in_proj`` as its parts ``z, x, B, C, dt`` (fused as ``in_proj`` in the one-process model), the
        convolution as its ``x, B, C`` channels (fused as ``conv``), ``out_proj`` row-parallel, and this
        rank's heads of ``A_log``, ``D``, ``dt_bias`` and of the norm. The projections are drawn as the
        attention's, the convolution with the variance of PyTorch's default ``Conv1d`` initialisation
        (``1/(3*width)``), ``dt_bias`` by :func:`initial_dt_bias`; ``A_log`` and ``D`` are set as built."""
        cfg, tp, rank, layer = self.cfg, self.groups.tp_size, self.groups.tp_rank, self.layer
        inits = {p: Init(layer, p, cfg.init_std) for p in self.sizes}
        out = fused_rows(prefix, self.in_proj, self.sizes, rank, tp, inits, fused=f"{prefix}.in_proj")
        conv = {p: self.sizes[p] for p in ("x", "B", "C")}
        conv_inits = {p: Init(layer, f"conv_{p}", (3.0 * cfg.mamba_conv) ** -0.5) for p in conv}
        out += fused_rows(f"{prefix}.conv", self.conv, conv, rank, tp, conv_inits, fused=f"{prefix}.conv")
        dt_bias = Init(layer, "dt_bias", full=lambda shape, seed: initial_dt_bias(shape[0], seed))
        for name, p, first in (
            ("A_log", self.A_log, None), ("D", self.D, None), ("dt_bias", self.dt_bias, dt_bias),
            ("norm.weight", self.norm.weight, None),
        ):  # fmt: skip
            out.append(Piece(f"{prefix}.{name}", p, (p.size(0) * tp,), (rank * p.size(0),), init=first))
        out_init = Init(layer, "out_proj", init.output_std(cfg))
        return out + row_split(f"{prefix}.out_proj", self.out_proj, rank, tp, out_init)

    def forward(self, x: torch.Tensor, cache: SSMCache | None = None) -> torch.Tensor:
        """``cache`` (inference, TP=CP=1): continue from its states and leave the new ones in it."""
        proj = self.in_proj(x)  # [seq (the CP rank's), batch, this TP rank's z, x, B, C, dt]
        cp = self.groups.cp_size
        if cp > 1:
            proj = self._to_heads(proj)
        inner, bc, heads = (size // cp for size in (self.inner, self.bc, self.heads))
        z, xbc, dt = proj.split([inner, inner + 2 * bc, heads], dim=-1)
        y = self.mix(z, xbc, dt, self._cp_slices(), cache)
        if cp > 1:
            y = self._to_sequence(y)
        return self.out_proj(y)

    def mix(
        self,
        z: torch.Tensor,
        xbc: torch.Tensor,
        dt: torch.Tensor,
        part: tuple[torch.Tensor, slice, slice],
        cache: SSMCache | None = None,
    ) -> torch.Tensor:
        """Convolution, scan, skip and gated norm over whole sequences ``[seq, batch, ...]`` of the heads
        ``part`` selects: (convolution channels, head slice, inner slice)."""
        channels, head_part, inner_part = part
        seq, cfg = z.size(0), self.cfg
        weight, bias = self.conv.weight[channels], self.conv.bias[channels]
        conv, history = causal_conv(xbc.permute(1, 2, 0), weight, bias, None if cache is None else cache.conv)
        inner, bc = z.size(-1), (xbc.size(-1) - z.size(-1)) // 2
        xs, B, C = F.silu(conv).transpose(1, 2).split([inner, bc, bc], dim=-1)
        heads, n = inner // cfg.mamba_head_dim, cfg.mamba_state
        xs = xs.unflatten(-1, (heads, cfg.mamba_head_dim))
        B, C = (t.unflatten(-1, (bc // n, n)).repeat_interleave(heads * n // bc, dim=2) for t in (B, C))
        step = F.softplus(dt.transpose(0, 1).float() + self.dt_bias[head_part].float())
        A = -torch.exp(self.A_log[head_part].float())
        chunk = min(cfg.mamba_chunk, seq)  # a shorter call (a decoding step) needs no padding to a full chunk
        y, state = ssd_scan(xs, step, A, B, C, chunk, None if cache is None else cache.ssm)
        y = y + xs * self.D[head_part].unsqueeze(-1).to(xs.dtype)
        y = self.norm(y.flatten(-2), z.transpose(0, 1), self.norm.weight[inner_part])
        if cache is not None:
            cache.advance(history, state, seq)
        return y.transpose(0, 1)

    def _cp_slices(self) -> tuple[torch.Tensor, slice, slice]:
        """This CP rank's convolution channels (of ``x``, ``B`` and ``C``), heads and inner channels."""
        cp, rank = self.groups.cp_size, self.groups.cp_rank
        inner, bc, heads = (size // cp for size in (self.inner, self.bc, self.heads))
        starts = (rank * inner, self.inner + rank * bc, self.inner + self.bc + rank * bc)
        device = self.conv.weight.device
        channels = torch.cat([torch.arange(s, s + n, device=device) for s, n in zip(starts, (inner, bc, bc))])
        return channels, slice(rank * heads, (rank + 1) * heads), slice(rank * inner, (rank + 1) * inner)

    def _to_heads(self, proj: torch.Tensor) -> torch.Tensor:
        """``[seq/cp, batch, z x B C dt]`` -> ``[seq, batch, (z x B C dt)/cp]``: every component's slice ``c``
        to CP rank ``c``, positions in global order."""
        cp, (seq, batch) = self.groups.cp_size, proj.shape[:2]
        parts = proj.split(list(self.sizes.values()), dim=-1)
        packed = torch.cat([p.reshape(seq, batch, cp, -1) for p in parts], dim=-1).reshape(seq, batch, -1)
        full = cp_ring.all_to_all_sp2hp(packed, group=self.groups.cp)
        to_global, _ = cp_ring.zigzag_permutation(cp, seq // 2, full.device)
        return full.index_select(0, to_global)

    def _to_sequence(self, y: torch.Tensor) -> torch.Tensor:
        """``[seq, batch, inner/cp]`` in global order -> this CP rank's positions ``[seq/cp, batch, inner]``."""
        cp = self.groups.cp_size
        _, to_rank_order = cp_ring.zigzag_permutation(cp, y.size(0) // (2 * cp), y.device)
        return cp_ring.all_to_all_hp2sp(y.index_select(0, to_rank_order), group=self.groups.cp)

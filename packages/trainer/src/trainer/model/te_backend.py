"""The Transformer Engine backend (``model.backend="te"``): the one module that imports
``transformer_engine``, and only when that backend is chosen.

What it changes, in place, after the chunks are built on their GPU: each transformer layer's four
tensor-parallel linear layers become ``te.pytorch.Linear`` (``parallel_mode`` column for ``qkv`` and
``fc1``, row for ``proj`` and ``fc2``, over the TP group, with sequence parallelism as configured), and
the core attention becomes ``te.pytorch.DotProductAttention`` (causal, grouped-query, over the CP group
with ``p2p`` for ring and ``a2a`` for Ulysses). The TE layers start from this model's weights and hold
them under the same names (``weight``, ``bias``) with the same ``[out, in]`` split, so checkpoints stay
layout-free and load into either backend. Norms, rotary embeddings, the embedding, the output layer and
the experts stay plain PyTorch: fusing a norm into ``LayerNormLinear``/``LayerNormMLP`` would move its
weight under another name. fp8 runs the forward under TE's ``autocast`` with the chosen recipe.

Written against Transformer Engine 2.x's documented API (``te.pytorch.Linear``, ``DotProductAttention``,
``autocast`` or, before 2.8, ``fp8_autocast``); it has not been run here (no GPU): the GPU validation
script (``packages/trainer/benchmarks/gpu_validation.py``) is its test.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist
import transformer_engine.pytorch as te
from torch import nn
from transformer_engine.common import recipe as te_recipe

from pstate import as_group

from ..errors import TrainerError
from .attention import Attention
from .config import ModelConfig
from .groups import ModelGroups
from .mlp import MLP

RECIPES = {
    "delayed": te_recipe.DelayedScaling,
    "current": te_recipe.Float8CurrentScaling,
    "mxfp8": te_recipe.MXFP8BlockScaling,
}


def _linear(old: nn.Module, mode: str, groups: ModelGroups) -> nn.Module:
    """A ``te.pytorch.Linear`` holding ``old``'s weights (this rank's split) and their pstate tags."""
    weight = old.weight
    new = te.Linear(
        old.in_features, old.out_features, bias=old.bias is not None, tp_group=as_group(groups.tp),
        tp_size=groups.tp_size, parallel_mode=mode, sequence_parallel=groups.sequence_parallel,
        params_dtype=weight.dtype, device=weight.device,
    )  # fmt: skip
    if old.bias is None:
        new.bias = None  # TE keeps an empty tensor there (never read without a bias); the pieces look for None
    pairs = [(new.weight, weight)] + ([(new.bias, old.bias)] if old.bias is not None else [])
    with torch.no_grad():
        for mine, theirs in pairs:
            if mine.shape != theirs.shape:
                raise TrainerError(f"te backend: TE's split {tuple(mine.shape)} is not ours {tuple(theirs.shape)}")
            mine.copy_(theirs)
            mine.__dict__.update(theirs.__dict__)  # tensor/sequence-parallel tags the reductions read
    return new


class TEAttention(Attention):
    """:class:`Attention` whose core is TE's ``DotProductAttention`` (set by :func:`to_te`)."""

    te_core: nn.Module

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, h, s, d = q.shape
        out = self.te_core(*(t.transpose(1, 2).contiguous() for t in (q, k, v)))  # bshd in, [b, s, h*d] out
        return out.view(b, s, h, d).transpose(1, 2)


def _core(cfg: ModelConfig, groups: ModelGroups) -> nn.Module:
    """TE's attention core for this model over the TP group (and the CP group, when there is one)."""
    cp: dict[str, object] = {}
    if groups.cp_size > 1:
        cp = dict(
            cp_group=as_group(groups.cp), cp_global_ranks=dist.get_process_group_ranks(as_group(groups.cp)),
            cp_stream=torch.cuda.Stream(),
            cp_comm_type="a2a" if groups.cp_attention == "ulysses" else "p2p",
        )  # fmt: skip
    return te.DotProductAttention(
        cfg.heads, cfg.head_dim, num_gqa_groups=cfg.num_kv_heads, attention_dropout=0.0, qkv_format="bshd",
        attn_mask_type="causal", tp_size=groups.tp_size, tp_group=as_group(groups.tp), **cp,
    )  # fmt: skip


def to_te(chunks: list[nn.Module], groups: ModelGroups) -> int:
    """Put TE modules into ``chunks``' transformer layers, in place; return how many layers changed."""
    count = 0
    for chunk in chunks:
        for module in list(chunk.modules()):
            if type(module) is Attention:
                module.qkv, module.proj = _linear(module.qkv, "column", groups), _linear(module.proj, "row", groups)
                module.__class__ = TEAttention
                module.te_core = _core(module.cfg, groups)
                count += 1
            elif type(module) is MLP:
                module.fc1, module.fc2 = _linear(module.fc1, "column", groups), _linear(module.fc2, "row", groups)
    return count


def fp8_autocast(recipe: str, group: dist.ProcessGroup | None) -> Callable[[], AbstractContextManager]:
    """What each forward runs under for fp8: TE's autocast with ``recipe`` (amaxes reduced over ``group``)."""
    if recipe == "mxfp8" and not te.is_mxfp8_available():
        raise TrainerError("train.fp8_recipe='mxfp8': this GPU has no MXFP8 support (Blackwell or later)")
    if not te.is_fp8_available():
        raise TrainerError("train.precision='fp8': this GPU has no FP8 support (Hopper or later)")
    chosen = RECIPES[recipe]()
    if hasattr(te, "autocast"):
        return lambda: te.autocast(enabled=True, recipe=chosen, amax_reduction_group=group)
    return lambda: te.fp8_autocast(enabled=True, fp8_recipe=chosen, fp8_group=group)

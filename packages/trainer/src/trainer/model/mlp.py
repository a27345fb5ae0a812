"""The dense MLP (GELU or SwiGLU) split over TP, and the MoE layer built from ``moe-dispatch``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_dispatch import MoELayer
from tp_layers import ColumnParallelLinear, RowParallelLinear

from ..errors import TrainerError
from . import init
from .config import ModelConfig
from .groups import ModelGroups


class MLP(nn.Module):
    """``fc2(act(fc1(x)))``; for SwiGLU ``fc1`` holds this rank's gate rows then its up rows."""

    def __init__(self, cfg: ModelConfig, groups: ModelGroups, layer: int, seed: int) -> None:
        super().__init__()
        tp, sp, f = groups.tp_size, groups.sequence_parallel, cfg.ffn
        if f % tp:
            raise TrainerError(f"tp={tp} must divide the FFN size ({f}) of the model")
        self.swiglu = cfg.mlp == "swiglu"
        roles = ("gate", "up") if self.swiglu else ("fc1",)
        full, bias = init.placeholder((f * len(roles), cfg.hidden)), cfg.has_bias("mlp")  # drawn per piece
        self.fc1 = ColumnParallelLinear(
            cfg.hidden, full.size(0), group=groups.tp, bias=bias, sequence_parallel=sp,
            full_weight=full, full_bias=torch.zeros(full.size(0)) if bias else None,
        )  # fmt: skip
        fc2 = init.placeholder((cfg.hidden, f))
        self.fc2 = RowParallelLinear(
            f, cfg.hidden, group=groups.tp, bias=bias, input_is_parallel=True, sequence_parallel=sp,
            full_weight=fc2, full_bias=torch.zeros(cfg.hidden) if bias else None,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.fc2(h)


def moe_layer(cfg: ModelConfig, groups: ModelGroups, layer: int, seed: int) -> MoELayer:
    """A mixture-of-experts MLP: experts over EP, each split over ETP; tokens are this rank's (SP) part."""
    if groups.tp_size > 1 and not groups.sequence_parallel:
        raise TrainerError("MoE layers with tp > 1 need sequence_parallel=True (each TP rank routes its own tokens)")
    return MoELayer(
        cfg.hidden,
        cfg.moe_ffn,
        cfg.num_experts,
        cfg.moe_topk,
        dispatcher=cfg.moe_dispatcher,
        ep_group=groups.ep,
        etp_group=groups.etp,
        activation="swiglu" if cfg.mlp == "swiglu" else "gelu",
        seed=init.tensor_seed(seed, layer, "router"),
        aux_loss_coeff=cfg.moe_aux_loss_coeff,
        aux_loss_group=groups.sequence_group,  # balance over whole sequences, as one process does
        sequence_parallel=groups.sequence_parallel,
        pre_softmax=not cfg.moe_norm_topk,
        score=cfg.moe_score,
        num_groups=cfg.moe_num_groups,
        topk_groups=cfg.moe_topk_groups,
        scaling_factor=cfg.moe_routed_scaling,
        z_loss_coeff=cfg.moe_z_loss_coeff,
        expert_bias=cfg.moe_expert_bias,
        capacity_factor=cfg.moe_capacity_factor,
        drop_policy=cfg.moe_drop_policy,
        pad_to_capacity=cfg.moe_pad_to_capacity,
        shared_ffn_hidden=cfg.moe_shared_ffn_hidden,
        shared_gate=cfg.moe_shared_gate,
        tp_group=groups.tp if cfg.moe_shared_ffn_hidden is not None else None,
    )

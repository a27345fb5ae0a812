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
from .pieces import Init, Piece, fused_rows, row_split, whole


class MLP(nn.Module):
    """``fc2(act(fc1(x)))``; for SwiGLU ``fc1`` holds this rank's gate rows then its up rows."""

    def __init__(self, cfg: ModelConfig, groups: ModelGroups, layer: int, seed: int) -> None:
        super().__init__()
        tp, sp, f = groups.tp_size, groups.sequence_parallel, cfg.ffn
        if f % tp:
            raise TrainerError(f"tp={tp} must divide the FFN size ({f}) of the model")
        self.cfg, self.groups, self.layer, self.swiglu = cfg, groups, layer, cfg.mlp == "swiglu"
        roles = ("gate", "up") if self.swiglu else ("fc1",)
        full, bias = init.placeholder((f * len(roles), cfg.hidden)), cfg.has_bias("mlp")  # drawn per piece
        self.fc1 = ColumnParallelLinear(
            cfg.hidden, full.size(0), group=groups.tp, bias=bias, sequence_parallel=sp,
            keep_gathered_input=groups.keep_gathered_input, full_weight=full,
            full_bias=torch.zeros(full.size(0)) if bias else None,
        )  # fmt: skip
        fc2 = init.placeholder((cfg.hidden, f))
        self.fc2 = RowParallelLinear(
            f, cfg.hidden, group=groups.tp, bias=bias, input_is_parallel=True, sequence_parallel=sp,
            full_weight=fc2, full_bias=torch.zeros(cfg.hidden) if bias else None,
        )  # fmt: skip

    def pieces(self, prefix: str) -> list[Piece]:
        """``gate`` and ``up`` (SwiGLU) or ``fc1``: this rank's rows of each; ``fc2``: its columns."""
        return dense_pieces(prefix, self.fc1, self.fc2, self.cfg.ffn, self.cfg, self.groups, self.layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.fc2(h)


def dense_pieces(
    prefix: str,
    fc1: nn.Module,
    fc2: nn.Module,
    ffn: int,
    cfg: ModelConfig,
    groups: ModelGroups,
    layer: int,
    *,
    draw: bool = True,
) -> list[Piece]:
    """A TP-split MLP of width ``ffn``: ``gate`` and ``up`` (SwiGLU) or ``fc1``, this rank's rows of each in
    ``fc1``; ``fc2``, its columns. ``draw=False``: its module draws its values (no :class:`Init`)."""
    tp, rank, f = groups.tp_size, groups.tp_rank, ffn // groups.tp_size
    parts = {"gate": f, "up": f} if cfg.mlp == "swiglu" else {"fc1": f}
    inits = {p: Init(layer, p, cfg.init_std) for p in parts} if draw else None
    fc2_init = Init(layer, "fc2", init.output_std(cfg)) if draw else None
    return fused_rows(prefix, fc1, parts, rank, tp, inits) + row_split(f"{prefix}.fc2", fc2, rank, tp, fc2_init)


class MoE(MoELayer):
    """The mixture-of-experts MLP of global layer ``layer``: experts over EP, each split over ETP; tokens are
    this rank's (SP) part. Its router draws its values in ``moe_dispatch`` as it is built; the experts and
    the shared expert are built at zero and drawn with their pieces (:meth:`draw_weights`, declared on
    their first piece, so a model built to be loaded skips them): ``moe_dispatch`` draws expert ``e`` from
    its own generator, streamed in bounded chunks of which a rank keeps its slices (the same values at any
    layout, and no rank holds more than its slices plus one chunk)."""

    def __init__(self, cfg: ModelConfig, groups: ModelGroups, layer: int, seed: int) -> None:
        if groups.tp_size > 1 and not groups.sequence_parallel:
            rule = "need sequence_parallel=True (each TP rank routes its own tokens)"
            raise TrainerError(f"MoE layers with tp > 1 {rule}")
        super().__init__(
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
            draw_experts=False,
        )
        self.cfg, self.groups, self.layer = cfg, groups, layer

    def draw_weights(self, seed: int) -> None:
        """Draw this rank's slices of the experts and of the shared expert from the run ``seed``, as
        ``MoELayer`` draws them from the layer's seed (the router's; the experts' is one more, the shared
        expert's two)."""
        layer_seed = init.tensor_seed(seed, self.layer, "router")
        self.experts.draw(layer_seed + 1)
        if self.shared_expert is not None:
            self.shared_expert.draw(layer_seed + 2)

    def pieces(self, prefix: str) -> list[Piece]:
        """The router (replicated); the experts as ``[experts, ...]`` tensors ``gate`` and ``up`` (SwiGLU; the
        column blocks of the fused first weight) or ``fc1``, and ``fc2``, of which this rank holds its EP
        range of experts and its ETP slice of each; the shared expert as a dense MLP ``shared`` with its
        replicated ``gate_weight``."""
        cfg, groups = self.cfg, self.groups
        out = [whole(f"{prefix}.router.{n}", p) for n, p in self.router.named_parameters()]
        etp, q, num = groups.etp_size, groups.etp_rank, cfg.num_experts
        first = groups.ep_rank * (num // groups.ep_size)
        w1, w2 = self.experts.weight1, self.experts.weight2
        names = ("gate", "up") if cfg.mlp == "swiglu" else ("fc1",)
        h, f = cfg.hidden, cfg.moe_ffn // etp
        drawn = Init(self.layer, "experts", fill=self.draw_weights)  # with the others, and the shared expert
        for i, name in enumerate(names):
            block, how = (i * f, (i + 1) * f), drawn if i == 0 else None
            shape, offsets = (num, f * etp, h), (first, q * f, 0)
            out.append(Piece(f"{prefix}.experts.{name}", w1, shape, offsets, dim1=block, init=how))
        out.append(Piece(f"{prefix}.experts.fc2", w2, (num, h, f * etp), (first, 0, q * f)))
        shared = self.shared_expert
        if shared is not None:
            width = cfg.moe_shared_ffn_hidden
            out += dense_pieces(f"{prefix}.shared", shared.fc1, shared.fc2, width, cfg, groups, self.layer, draw=False)
            if shared.gate_weight is not None:
                out.append(whole(f"{prefix}.shared.gate_weight", shared.gate_weight))
        return out


def moe_layer(cfg: ModelConfig, groups: ModelGroups, layer: int, seed: int) -> MoE:
    """A mixture-of-experts MLP (:class:`MoE`)."""
    return MoE(cfg, groups, layer, seed)

"""The rules of a model's MoE router fields (``ModelConfig.moe_*``), each broken one named in one line.

They mirror :func:`moe_dispatch.router.check_router_args` in the config's own names, so a bad value is
refused when the configuration is read, before any rank starts.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import TrainerError


def check_router(cfg: Any) -> None:
    """Raise :class:`TrainerError` for the first router field of ``cfg`` (a ``ModelConfig``) that breaks its rule."""
    for name in ("moe_aux_loss_coeff", "moe_z_loss_coeff"):
        _number(name, getattr(cfg, name), "a finite number >= 0", lambda v: v >= 0)
    for name in ("moe_routed_scaling", "moe_expert_bias_rate"):
        _number(name, getattr(cfg, name), "a finite number > 0", lambda v: v > 0)
    if cfg.moe_capacity_factor is not None:
        _number("moe_capacity_factor", cfg.moe_capacity_factor, "a finite number > 0 (or left out: dropless)",
                lambda v: v > 0)  # fmt: skip
    groups, chosen = cfg.moe_num_groups, cfg.moe_topk_groups
    if not _integer(groups) or groups < 1:
        raise TrainerError(f"model.moe_num_groups={groups!r}: must be a positive integer")
    if chosen is not None and (not _integer(chosen) or not 1 <= chosen <= groups):
        raise TrainerError(f"model.moe_topk_groups={chosen!r}: must be an integer in [1, moe_num_groups={groups}]")
    for name in ("moe_expert_bias", "moe_pad_to_capacity"):
        if not isinstance(getattr(cfg, name), bool):
            raise TrainerError(f"model.{name}={getattr(cfg, name)!r}: must be true or false")
    if cfg.moe_pad_to_capacity and cfg.moe_capacity_factor is None:
        raise TrainerError("model.moe_pad_to_capacity=True: needs model.moe_capacity_factor (dropless has no capacity)")
    if cfg.moe_score == "sigmoid" and not cfg.moe_norm_topk:
        raise TrainerError("model.moe_norm_topk=False: not supported with moe_score='sigmoid' (top-k renormalized)")
    experts = cfg.num_experts
    if not experts:
        return
    if experts % groups:
        raise TrainerError(f"model.moe_num_groups={groups}: must divide num_experts={experts}")
    if chosen is not None and cfg.moe_topk > chosen * (experts // groups):
        raise TrainerError(
            f"model.moe_topk={cfg.moe_topk}: must be <= moe_topk_groups * experts per group = "
            f"{chosen}*{experts // groups} = {chosen * (experts // groups)}"
        )


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(name: str, value: Any, rule: str, test: Any) -> None:
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not finite or not test(value):
        raise TrainerError(f"model.{name}={value!r}: must be {rule}")

"""DeepSeek-V3's mixture-of-experts settings against our ``ModelConfig.moe_*`` fields, both ways.

Its router (``DeepseekV3TopkRouter``): sigmoid scores; each token's ``topk_group`` best of ``n_group``
groups by the sum of each group's two best scores plus ``e_score_correction_bias``, then its
``num_experts_per_tok`` best experts inside them by the same biased scores; the weights are the
unbiased scores of those, renormalized to sum to one and times ``routed_scaling_factor``. That is our
router with ``moe_score="sigmoid"``, ``moe_expert_bias`` (the bias is imported into and exported from
its buffer), ``moe_num_groups``/``moe_topk_groups`` and ``moe_routed_scaling``. Every layer from
``first_k_dense_replace`` on is MoE (``moe_first_dense``), with an ungated shared expert of
``n_shared_experts * moe_intermediate_size``.
"""

from __future__ import annotations

from typing import Any

from ..errors import TrainerError
from ..model import ModelConfig
from .reader import refuse

DEEPSEEK_MOE_KEYS = (
    "moe_intermediate_size", "n_shared_experts", "n_routed_experts", "routed_scaling_factor", "n_group",
    "topk_group", "num_experts_per_tok", "norm_topk_prob", "scoring_func", "topk_method", "moe_layer_freq",
)  # fmt: skip
"""The MoE keys of a DeepSeek-V3 ``config.json`` (read; unused when no layer is MoE)."""


def deepseek_moe_fields(r: Any, dense: int) -> dict[str, Any]:
    """Our MoE fields from the keys ``r`` (``trainer.hf.config``'s reader) holds; ``dense``: the model's
    ``first_k_dense_replace``. A setting our router computes differently is refused by its key."""
    r.only("scoring_func", ("sigmoid",), "only DeepSeek-V3's sigmoid router is supported")
    r.only("topk_method", ("noaux_tc",), "only DeepSeek-V3's noaux_tc (group-limited, bias-corrected) choice")
    r.only("moe_layer_freq", (1,), "transformers' DeepSeek-V3 makes every layer past first_k_dense_replace MoE")
    r.only("norm_topk_prob", (True,), "our sigmoid router renormalizes the chosen scores")
    topk, shared, ffn = r.need("num_experts_per_tok"), r.need("n_shared_experts"), r.need("moe_intermediate_size")
    if topk == 1:  # transformers renormalizes one chosen score to 1; our router keeps it (Megatron's)
        raise refuse("num_experts_per_tok", topk, "a sigmoid router with one expert per token does not convert")
    if shared < 1:
        raise refuse("n_shared_experts", shared, "DeepSeek-V3 MoE layers convert with a shared expert (>= 1)")
    groups = r.get("n_group", 1)
    return dict(
        num_experts=r.need("n_routed_experts"), moe_topk=topk, moe_ffn_hidden=ffn, moe_first_dense=dense,
        moe_shared_ffn_hidden=shared * ffn, moe_score="sigmoid", moe_norm_topk=True, moe_expert_bias=True,
        moe_num_groups=groups, moe_topk_groups=r.get("topk_group", groups),
        moe_routed_scaling=float(r.get("routed_scaling_factor", 1.0)),
    )  # fmt: skip


def check_deepseek_moe(model: ModelConfig) -> None:
    """Refuse, by field, an MoE model (``attention="mla"``) that DeepSeek-V3's config cannot express."""
    routing = {"moe_score": "sigmoid", "moe_norm_topk": True, "moe_expert_bias": True, "moe_every": 1,
               "moe_shared_gate": False}  # fmt: skip
    for name, theirs in routing.items():
        if getattr(model, name) != theirs:
            raise TrainerError(f"model.{name}={getattr(model, name)!r}: DeepSeek-V3's MoE layers have {theirs!r}")
    shared = model.moe_shared_ffn_hidden
    if shared is None or shared % model.moe_ffn:
        rule = f"DeepSeek-V3's shared expert is a positive multiple of moe_ffn_hidden={model.moe_ffn} wide"
        raise TrainerError(f"model.moe_shared_ffn_hidden={shared}: {rule}")
    if model.moe_topk == 1:
        raise TrainerError("model.moe_topk=1: transformers renormalizes one sigmoid score to 1, our router does not")


def deepseek_moe_config(model: ModelConfig) -> dict[str, Any]:
    """The MoE keys of ``config.json`` for ``model`` (checked by :func:`check_deepseek_moe`)."""
    return dict(
        first_k_dense_replace=model.moe_first_dense, n_routed_experts=model.num_experts,
        num_experts_per_tok=model.moe_topk, moe_intermediate_size=model.moe_ffn,
        n_shared_experts=model.moe_shared_ffn_hidden // model.moe_ffn, n_group=model.moe_num_groups,
        topk_group=model.moe_topk_groups or model.moe_num_groups, routed_scaling_factor=model.moe_routed_scaling,
        norm_topk_prob=True,
    )  # fmt: skip

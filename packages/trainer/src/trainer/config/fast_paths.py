"""The optional fast paths (Transformer Engine layers, fp8 matmuls, DeepEP's dispatcher), checked before any
rank starts: a choice whose package is missing, or that the path cannot run, is refused in one line naming
the field, the value and what is missing."""

from __future__ import annotations

from importlib.util import find_spec

import torch

from ..errors import TrainerError
from ..model.float8 import TORCHAO_RECIPES
from .run import RunConfig


def check_fast_paths(cfg: RunConfig) -> None:
    """Raise :class:`TrainerError` for the first fast-path choice of ``cfg`` that cannot run here (the
    combinations no fast path supports first, then what this machine lacks)."""
    m, t = cfg.model, cfg.train
    te, fp8, flex = m.backend == "te", t.precision == "fp8", m.moe_dispatcher == "flex"
    rules = [
        (te and t.zero == 3, "model.backend='te' with --zero 3 is not supported yet; use --zero 0, 1 or 2"),
        (te and m.attention == "mla", "model.backend='te' with model.attention='mla' is not supported yet"),
        (
            te and t.cp_attention == "hierarchical" and cfg.parallel.cp > 1,
            "model.backend='te' with train.cp_attention='hierarchical' is not supported yet; use 'ring' or 'ulysses'",
        ),
        (
            te and m.layer_pattern is not None,
            "model.backend='te' with a hybrid model.layer_pattern is not supported yet",
        ),
        (
            te and cfg.data.packing != "none",
            f"model.backend='te' with data.packing={cfg.data.packing!r} is not supported yet (TE's attention "
            "would not see the document masks)",
        ),
        (
            te and find_spec("transformer_engine") is None,
            "model.backend='te': needs the transformer_engine package (Transformer Engine), which is not installed",
        ),
        (te and not torch.cuda.is_available(), "model.backend='te': needs a CUDA GPU, none is visible"),
        (
            fp8 and not te and find_spec("torchao") is None,
            "train.precision='fp8' with model.backend='torch': needs the torchao package "
            "(pip install 'trainer[fp8]'), which is not installed",
        ),
        (
            fp8 and not te and t.fp8_recipe not in TORCHAO_RECIPES,
            f"train.fp8_recipe={t.fp8_recipe!r}: model.backend='torch' (torchao) scales by the current amax only "
            f"({', '.join(map(repr, TORCHAO_RECIPES))}); delayed and mxfp8 need model.backend='te'",
        ),
        (fp8 and t.zero == 3, "train.precision='fp8' with --zero 3 is not supported yet; use --zero 0, 1 or 2"),
        (
            flex and find_spec("deep_ep") is None,
            "model.moe_dispatcher='flex': needs the deep_ep package (DeepEP), which is not installed",
        ),
        (flex and cfg.parallel.etp != 1, "model.moe_dispatcher='flex' needs etp=1 (DeepEP moves whole tokens)"),
    ]
    for broken, rule in rules:
        if broken:
            raise TrainerError(rule)

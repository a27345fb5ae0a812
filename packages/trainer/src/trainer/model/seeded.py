"""The initial values of a model's pieces, drawn where they live: each named piece of
:func:`~trainer.model.shards.model_pieces` (global shape, this rank's offsets) is drawn with
:func:`~trainer.model.init.normal_piece` from its tensor's seed, so a rank draws only its pieces (plus at
most one block) and every layout holds the one-process model's values.

Biases start at zero and norms at one as the modules build them; the experts, the router and the
shared expert draw their own values in ``moe_dispatch``. A Mamba-2 mixer's projections are drawn as the
attention's; its convolution with the variance of PyTorch's default ``Conv1d`` initialisation
(``1/(3*width)``), its ``dt_bias`` from :func:`~trainer.model.mamba.initial_dt_bias`; ``A_log`` and ``D``
are set as the module builds them.
"""

from __future__ import annotations

import torch

from . import init
from .gpt import GPTChunk
from .mamba import initial_dt_bias
from .shards import model_pieces

_EMBEDDING_ROLES = {"embedding.weight": "embedding", "position.weight": "position", "head.weight": "head"}
_LAYER_ROLES = {
    "attn": ("q", "k", "v", "proj", "q_down", "q_up", "kv_down", "kv_up"),
    "mlp": ("gate", "up", "fc1", "fc2"),
    "mamba": ("z", "x", "B", "C", "dt", "out_proj"),
}
_OUTPUT = ("proj", "fc2", "out_proj")  # write into the residual stream: GPT-2's smaller deviation


def _role(name: str, layers: int) -> tuple[int, str] | None:
    """``(global layer, role)`` of a randomly initialised weight, else ``None``. MTP module ``k``'s tensors
    (``mtp.<k>.proj``, ``mtp.<k>.block.*``) are those of global layer ``layers + k``."""
    if name in _EMBEDDING_ROLES:
        return init.EMBEDDING_LAYER, _EMBEDDING_ROLES[name]
    parts = name.split(".")
    if parts[0] == "mtp":
        layer = layers + int(parts[1])
        if parts[2:] == ["proj", "weight"]:
            return layer, "eh_proj"
        parts = ["layers", str(layer), *parts[3:]] if parts[2] == "block" else parts
    if len(parts) == 5 and parts[0] == "layers" and parts[4] == "weight" and parts[3] in _LAYER_ROLES.get(parts[2], ()):
        return int(parts[1]), parts[3]
    if len(parts) == 6 and parts[2:4] == ["mamba", "conv"] and parts[5] == "weight":
        return int(parts[1]), f"conv_{parts[4]}"
    return None


def draw_initial_pieces(chunks: list[GPTChunk], seed: int) -> None:
    """Fill the randomly initialised weights of ``chunks`` (built around placeholders) with their values."""
    with torch.no_grad():
        for piece in model_pieces(chunks):
            role = _role(piece.name, chunks[0].cfg.layers)
            target = piece.of(piece.param.data)
            cfg = chunks[0].cfg
            if piece.name.endswith(".mamba.dt_bias"):
                full = initial_dt_bias(
                    cfg.mamba_heads, init.tensor_seed(seed, int(piece.name.split(".")[1]), "dt_bias")
                )
                target.copy_(full[piece.offsets[0] : piece.offsets[0] + target.size(0)])
            if role is None or target.numel() == 0:
                continue
            if role[1].startswith("conv_"):
                std = (3.0 * cfg.mamba_conv) ** -0.5
            elif role[1] in _OUTPUT:
                std = init.output_std(cfg.init_std, cfg.layers)
            else:
                std = cfg.init_std
            init.normal_piece(piece.global_shape, std, init.tensor_seed(seed, *role), piece.offsets, target)

"""A run's checkpoint state in layout-free names, so it saves at one layout and loads at any other.

``model``: every named piece of the parameters (:func:`trainer.model.model_pieces`). ``optimizer``:
AdamW's moments under the same names; with ZeRO, the optimizer's flat-range shards split along the
same pieces (and its fp32 master weights); ``step`` as a replicated scalar. ``progress``: the step and
the data position (consumed samples, which resume at any DP size). ``rng``: each rank's generator.

:func:`run_state` builds the state as views of the live tensors: ``ckpt.save`` reads them and
``ckpt.load`` fills them in place; :func:`finish_load` then hands ZeRO state to the optimizer.
"""

from __future__ import annotations

from typing import Any

import torch

from ckpt import PerRank

from ..model.shards import Piece, flat_range_shards, model_pieces
from .setup import Run

ADAM = ("exp_avg", "exp_avg_sq")


def run_state(run: Run, step: int, data_state: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint state of ``run`` at ``step`` (views of the live tensors)."""
    pieces = model_pieces(run.chunks)
    by_param: dict[int, list[Piece]] = {}
    for piece in pieces:
        by_param.setdefault(id(piece.param), []).append(piece)
    state: dict[str, Any] = {
        "model": {piece.name: piece.shard(piece.param.data) for piece in pieces},
        "progress": {"step": step, "data": data_state},
        "rng": PerRank(torch.get_rng_state(), required=False),
    }
    if run.sharded:
        state["optimizer"], state["_zero"] = _zero_state(run, by_param)
    else:
        state["optimizer"] = _adam_state(run, by_param)
    return state


def finish_load(run: Run, state: dict[str, Any]) -> None:
    """After ``ckpt.load`` filled ``state``: give ZeRO state to the optimizer, restore the generator."""
    if run.sharded:
        run.optimizer.load_state_dict(state["_zero"])
    torch.set_rng_state(state["rng"].value if isinstance(state["rng"], PerRank) else state["rng"])


def saveable(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without the optimizer's own (layout-bound) state dict, which is only a load target."""
    return {k: v for k, v in state.items() if not k.startswith("_")}


def _adam_state(run: Run, by_param: dict[int, list[Piece]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for group in run.optimizer.param_groups:
        for p in group["params"]:
            s = run.optimizer.state[p]
            if not s:  # a fresh AdamW: its first step finds this and proceeds as from zero
                s.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            for piece in by_param[id(p)]:
                out[piece.name] = {name: piece.shard(s[name]) for name in ADAM} | {"step": s["step"]}
    return out


def _zero_state(run: Run, by_param: dict[int, list[Piece]]) -> tuple[dict[str, Any], dict[str, Any]]:
    own = run.optimizer.state_dict()
    out: dict[str, Any] = {}
    for key, entry in own["state"].items():
        pieces = by_param[id(run.named[key])]
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                for piece in pieces:
                    out.setdefault(piece.name, {})[name] = value
            else:
                for piece_name, shard in flat_range_shards(pieces, value).items():
                    out.setdefault(piece_name, {})[name] = shard
    return out, own

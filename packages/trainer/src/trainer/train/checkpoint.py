"""A run's checkpoint state in layout-free names, so it saves at one layout and loads at any other.

``model``: every named piece of the parameters (:func:`trainer.model.model_pieces`). ``optimizer``:
AdamW's moments under the same names (with ZeRO and FSDP, their flat-range shards split along the
same pieces) and ``step`` as a replicated scalar; the fp32 master weights are the parameters, saved
once as the model. So any of DDP, ZeRO-1/2 and FSDP loads what any other saved. ``progress``: the
step and the data position (consumed samples, which resume at any DP size). ``rng``: each rank's
generator. ``expert_bias``: the MoE routers' expert biases (aux-loss-free balancing; buffers, so
neither model nor optimizer state), when the model has them. ``dropout``: each chunk's dropout
generator states (:class:`trainer.model.dropout.DropoutRNG`), by device type; a run resumed at the
layout that saved them restores them (at another layout the stages and shards draw other masks
anyway, and start again from the seed).

:func:`run_state` builds the state as views of the live tensors: ``ckpt.save`` reads them and
``ckpt.load`` fills them in place; :func:`finish_load` then hands ZeRO state to the optimizer. With
MoE, ZeRO shards the experts' state over ``edp``, and the flat range of their fused ``[gate; up]``
weight is split into the ``gate`` and ``up`` tensors' flat ranges; those elements are not contiguous in
the range, so they are copies (``state["_gathered"]``), written back into the optimizer's state dict
before it is loaded.
"""

from __future__ import annotations

from typing import Any

import torch

from ckpt import PerRank
from dp_shard import optimizer_state_shards, parameter_shards
from pstate import Shard

from ..model.shards import Gathered, Piece, expert_bias_shards, flat_range_shards, model_pieces
from .setup import Run

ADAM = ("exp_avg", "exp_avg_sq")
MASTER = "master_param"


def run_state(run: Run, step: int, data_state: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint state of ``run`` at ``step`` (views of the live tensors)."""
    state: dict[str, Any] = {
        "progress": {"step": step, "data": data_state},
        "rng": PerRank(torch.get_rng_state(), required=False),
        "dropout": {run.device.type: _dropout_states(run)},
    }
    if biases := expert_bias_shards(run.chunks):
        state["expert_bias"] = biases
    if run.fsdp:
        state["model"], state["optimizer"], state["_gathered"] = _fsdp_state(run)
        return state
    pieces = model_pieces(run.chunks)
    by_param: dict[int, list[Piece]] = {}
    for piece in pieces:
        by_param.setdefault(id(piece.param), []).append(piece)
    state["model"] = {piece.name: piece.shard(piece.param.data) for piece in pieces}
    if run.sharded:
        state["optimizer"], state["_zero"], state["_gathered"] = _zero_state(run, by_param)
    else:
        state["optimizer"] = _adam_state(run, by_param)
    return state


def finish_load(run: Run, state: dict[str, Any]) -> None:
    """After ``ckpt.load`` filled ``state``: give ZeRO state to the optimizer, restore the generator."""
    for copy in state.get("_gathered", ()):  # ZeRO/FSDP: column blocks of experts loaded into copies
        copy.scatter()
    if run.sharded:  # its entries carry no masters: it takes them from the parameters just loaded
        run.optimizer.load_state_dict(state["_zero"])
    torch.set_rng_state(state["rng"].value if isinstance(state["rng"], PerRank) else state["rng"])
    for chunk, states in zip(run.chunks, state.get("dropout", {}).get(run.device.type, {}).values()):
        values = {name: v.value if isinstance(v, PerRank) else v for name, v in states.items()}
        chunk.rng.tracker(run.device).set_states(values)


def _dropout_states(run: Run) -> dict[str, dict[str, PerRank]]:
    return {
        f"chunk{i}": {name: PerRank(s, required=False) for name, s in c.rng.tracker(run.device).get_states().items()}
        for i, c in enumerate(run.chunks)
    }


def saveable(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without the optimizer's own (layout-bound) state dict, which is only a load target."""
    return {k: v for k, v in state.items() if not k.startswith("_")}


def _adam_state(run: Run, by_param: dict[int, list[Piece]]) -> dict[str, Any]:
    _init_adam(run.optimizer)
    out: dict[str, Any] = {}
    for group in run.optimizer.param_groups:
        for p in group["params"]:
            s = run.optimizer.state[p]
            for piece in by_param[id(p)]:
                out[piece.name] = {name: piece.shard(s[name]) for name in ADAM} | {"step": s["step"]}
    return out


def _zero_state(run: Run, by_param: dict[int, list[Piece]]) -> tuple[dict[str, Any], dict[str, Any], list[Gathered]]:
    own = run.optimizer.state_dict()  # expert entries: ranges of this rank's experts, sharded over edp
    out: dict[str, Any] = {}
    gathered: list[Gathered] = []
    for key, entry in own["state"].items():
        del entry[MASTER]  # the fp32 masters hold the model's values: saved once, as the model
        _split_entries(by_param[id(run.named[key])], entry, out, gathered)
    return out, own, gathered


def _fsdp_state(run: Run) -> tuple[dict[str, Any], dict[str, Any], list[Gathered]]:
    """ZeRO-3: each parameter's flat piece (and AdamW's moments of it) split along its named pieces (experts
    sharded over edp, their fused ``[gate; up]`` split as under ZeRO-1/2)."""
    _init_adam(run.optimizer)
    model: dict[str, Any] = {}
    optimizer: dict[str, Any] = {}
    gathered: list[Gathered] = []
    for chunk, pieces in zip(run.chunks, run.fsdp_pieces):
        for name, local in parameter_shards(chunk).items():
            model.update(flat_range_shards(pieces[name], local, gathered))
        for name, entries in optimizer_state_shards(chunk, run.optimizer).items():
            _split_entries(pieces[name], entries, optimizer, gathered)
    return model, optimizer, gathered


def _split_entries(
    pieces: list[Piece], entries: dict[str, Any], out: dict[str, dict[str, Any]], gathered: list[Gathered] | None = None
) -> None:
    """One parameter's optimizer state into ``out[piece name][state]``: a flat-range ``Shard`` split along
    the parameter's pieces, a scalar (``step``) given to each piece. ``gathered``: see ``flat_range_shards``."""
    for key, value in entries.items():
        if isinstance(value, Shard):
            for piece_name, shard in flat_range_shards(pieces, value, gathered).items():
                out.setdefault(piece_name, {})[key] = shard
        else:
            for piece in pieces:
                out.setdefault(piece.name, {})[key] = value


def _init_adam(optimizer: torch.optim.Optimizer) -> None:
    """Give a fresh AdamW its state (zeros, step 0), which its first step would create the same way."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            s = optimizer.state[p]
            if not s:
                s.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))

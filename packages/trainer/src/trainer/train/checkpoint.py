"""A run's checkpoint state in layout-free names, so it saves at one layout and loads at any other.

``model``: every named piece of the parameters (:func:`trainer.model.model_pieces`). ``optimizer``:
the optimizer's state under the same names (AdamW's moments, split along the same pieces, and ``step``
as a replicated scalar). Both come from the data-parallel engine
(:meth:`dp_shard.DataParallelEngine.checkpoint_pieces`), which says, whatever its mode, which elements
of each parameter and of its optimizer state this rank stores (a whole parameter, or a ZeRO flat
range); they are split here along the parameter's named pieces (``run.pieces``), so any of DDP,
ZeRO-1/2 and FSDP loads what any other saved. ``plan``: the run's resolved :class:`RunPlan`, as
values. ``progress``: the step and the data position (consumed samples, which resume at any DP size).
``rng``: each rank's generator. ``expert_bias``: the MoE routers' expert biases (aux-loss-free
balancing; buffers, so neither model nor optimizer state), when the model has them. ``dropout``: each
chunk's dropout generator states (:class:`trainer.model.dropout.DropoutRNG`), by device type; a run
resumed at the layout that saved them restores them (at another layout the stages and shards draw
other masks anyway, and start again from the seed). ``loss_scaler``: fp16's dynamic loss scale and its count
of clean steps (the same on every rank), so a resumed run scales and skips as the uninterrupted one; a
checkpoint without it (another precision's) leaves the scaler at its start.

:func:`run_state` builds the state as views of the live tensors: ``ckpt.save`` reads them and
``ckpt.load`` fills them in place; :func:`finish_load` then lets the engine take what was loaded. With
MoE, ZeRO shards the experts' state over ``edp``, and the flat range of their fused ``[gate; up]``
weight is split into the ``gate`` and ``up`` tensors' flat ranges; those elements are not contiguous in
the range, so they are copies (``state["_gathered"]``), written back before the engine takes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import ckpt
from ckpt import PerRank
from dp_shard import CheckpointPieces
from pstate import Shard

from ..config import RunPlan, to_toml
from ..config.resolved import GRID
from ..model.shards import Gathered, Piece, expert_bias_shards, flat_range_shards
from .replicas import replicas
from .setup import Run


@dataclass(frozen=True)
class Loaded:
    """What :func:`load_run` restored: the ``step`` and the ``data`` position to continue from (``None``: the
    checkpoint held weights only, a new run starts from them), and ``plan_change``, one line saying how
    this run's plan differs from the saved one."""

    step: int
    data: dict[str, Any] | None
    plan_change: str


def save_run(
    run: Run,
    step: int,
    data_state: dict[str, Any],
    path: Path,
    *,
    keep: int | None = None,
    saver: ckpt.AsyncSaver | None = None,
) -> Any:
    """Save ``run`` at ``step`` to ``path`` (in the background with ``saver``: its handle, else ``None``);
    each rank plans its writes alone, from the layout."""
    state = saveable(run_state(run, step, data_state))
    state["config"] = to_toml(run.cfg)
    held = replicas(run.ps.layout, run.ps.rank, run.model.tied_embeddings)
    layout = run.plan.layout_sizes()
    if saver is None:
        ckpt.save(state, path, layout=layout, keep=keep, replicas=held)
        return None
    return saver.save(state, path, layout=layout, keep=keep, replicas=held)


def load_run(run: Run, found: Path, data_state: dict[str, Any]) -> Loaded:
    """Load the checkpoint at ``found`` into ``run``, whatever layout and ZeRO mode saved it. A checkpoint
    of weights only (``trainer convert``) loads the model (and imported routers' biases) alone."""
    state = run_state(run, 0, data_state)
    state.pop("plan")  # the saved plan is read from the index, only to report what changed
    summary = ckpt.inspect(found)
    saved_dropout = any(key.startswith("dropout/") for key in summary["rank_tensors"])
    if not same_stages(run.plan, summary) or not saved_dropout:  # streams per stage and TP rank
        state.pop("dropout")
    if "loss_scaler" in state and not any(key.startswith("loss_scaler/") for key in summary["values"]):
        state.pop("loss_scaler")  # saved by a run without fp16: the scale starts afresh
    if not any(key.startswith("progress/") for key in summary["values"]):
        weights = {"model": state["model"]}  # weights only (trainer convert): a new run from them
        if "expert_bias" in state and any(t["name"].startswith("expert_bias/") for t in summary["tensors"]):
            weights["expert_bias"] = state["expert_bias"]  # imported routers' biases (DeepSeek-V3)
        ckpt.load(weights, found)
        return Loaded(0, None, "")
    state.update(ckpt.load(saveable(state), found))
    finish_load(run, state)
    return Loaded(int(state["progress"]["step"]), state["progress"]["data"], plan_change(run.plan, summary))


def saved_plan(summary: dict[str, Any]) -> RunPlan | None:
    """The run plan a checkpoint recorded (from ``ckpt.inspect``'s summary), or ``None`` if it has none."""
    values = {k.split("/", 1)[1]: v for k, v in summary["values"].items() if k.startswith("plan/")}
    return RunPlan.from_dict(values) if values else None


def same_stages(plan: RunPlan, summary: dict[str, Any]) -> bool:
    """Whether each rank of ``plan`` holds the stage, layers and slices the same rank held in the checkpoint
    ``summary`` describes: the same grid sizes and layers per stage (HSDP's and hierarchical CP's sub-groups
    place nothing). A checkpoint that did not record its layers per stage passes only with even stages."""
    saved = saved_plan(summary)
    stages = None if saved is None else saved.pipeline_layout
    return {k: summary["layout"].get(k) for k in GRID} == plan.grid_sizes() and stages == plan.pipeline_layout


def plan_change(plan: RunPlan, summary: dict[str, Any]) -> str:
    """One line: how ``plan`` differs from the plan that saved the checkpoint ``summary`` describes."""
    saved = saved_plan(summary)
    return "no run plan saved" if saved is None else plan.describe_changes(saved)


def run_state(run: Run, step: int, data_state: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint state of ``run`` at ``step`` (views of the live tensors)."""
    state: dict[str, Any] = {
        "plan": run.plan.as_dict(),
        "progress": {"step": step, "data": data_state},
        "rng": PerRank(torch.get_rng_state(), required=False),
        "dropout": {run.device.type: _dropout_states(run)},
    }
    if run.scaler is not None:
        state["loss_scaler"] = run.scaler.state_dict()
    if biases := expert_bias_shards(run.chunks):
        state["expert_bias"] = biases
    engine = run.engine.checkpoint_pieces()
    gathered: list[Gathered] = []
    state["model"], state["optimizer"] = {}, {}
    for name, local in engine.params.items():
        state["model"].update(_split(run.pieces[name], local, gathered))
    for name, entries in engine.optimizer.items():
        for key, value in entries.items():
            if isinstance(value, Shard):
                for piece_name, shard in _split(run.pieces[name], value, gathered).items():
                    state["optimizer"].setdefault(piece_name, {})[key] = shard
            else:  # a scalar (AdamW's step), the same for each piece
                for piece in run.pieces[name]:
                    state["optimizer"].setdefault(piece.name, {})[key] = value
    state["_engine"], state["_gathered"] = engine, gathered
    return state


def finish_load(run: Run, state: dict[str, Any]) -> None:
    """After ``ckpt.load`` filled ``state``: write back the copies, let the engine take its state (ZeRO-1/2
    loads its optimizer's state dict, the masters from the parameters just loaded), restore the
    generators."""
    for copy in state["_gathered"]:
        copy.scatter()
    engine: CheckpointPieces = state["_engine"]
    engine.finish_load()
    if run.scaler is not None and "loss_scaler" in state:
        run.scaler.load_state_dict(state["loss_scaler"])
    torch.set_rng_state(state["rng"].value if isinstance(state["rng"], PerRank) else state["rng"])
    for chunk, states in zip(run.chunks, state.get("dropout", {}).get(run.device.type, {}).values()):
        values = {name: v.value if isinstance(v, PerRank) else v for name, v in states.items()}
        chunk.rng.tracker(run.device).set_states(values)


def _split(pieces: list[Piece], local: Shard, gathered: list[Gathered]) -> dict[str, Shard]:
    """``local`` (the engine's elements of one parameter, in the parameter's frame: all of it, or a flat
    range) split along the parameter's named ``pieces``."""
    if local.flat_range is None:
        return {piece.name: piece.shard(local.data) for piece in pieces}
    return flat_range_shards(pieces, local, gathered)


def _dropout_states(run: Run) -> dict[str, dict[str, PerRank]]:
    return {
        f"chunk{i}": {name: PerRank(s, required=False) for name, s in c.rng.tracker(run.device).get_states().items()}
        for i, c in enumerate(run.chunks)
    }


def saveable(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without the optimizer's own (layout-bound) state dict, which is only a load target."""
    return {k: v for k, v in state.items() if not k.startswith("_")}

"""What a checkpoint saves and loads of a data-parallel engine, the same form whatever the mode.

:class:`CheckpointPieces` names every trainable parameter by the engine's name for it
(``engine.named``: ``chunk{i}.{name in the chunk}``) and describes it in the frame of the parameter as
this rank's chunk holds it (``global_shape`` = the chunk parameter's shape, zero offsets):

- ``params[name]``: the elements of the parameter's values this rank stores (the whole parameter under
  DDP and ZeRO-1/2, where every rank of the group holds it; a flat range under ZeRO-3);
- ``optimizer[name][state]``: per-element optimizer state (AdamW's moments) as a ``Shard`` in the same
  frame (a flat range where ZeRO shards it), and scalar state (AdamW's ``step``) as it is.

A caller splits these along its own layout-free names and gives them to ``ckpt``. The shards are views
of the live tensors (or of a state dict the engine loads afterwards): ``ckpt.load`` fills them in place,
then :meth:`CheckpointPieces.finish_load` hands them to the optimizer. ZeRO-1/2 masters of fp32
parameters are the parameters' own elements, so they are saved once, as ``params``; 16-bit parameters
(DDP and ZeRO-1/2) are saved as their fp32 masters under the same names, so a run resumes, or changes
mode or precision, without rounding them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pstate import Shard

from .errors import DataParallelError
from .fsdp_checkpoint import optimizer_state_shards, parameter_shards
from .sharded_state import MASTER, probe_state_kinds


@dataclass
class CheckpointPieces:
    """An engine's checkpoint state (see the module notes); :meth:`finish_load` after ``ckpt.load``."""

    params: dict[str, Shard]
    optimizer: dict[str, dict[str, Any]]
    finish: Callable[[], None] | None = field(default=None, repr=False)

    def finish_load(self) -> None:
        """Give what ``ckpt.load`` filled in to the optimizer (ZeRO-1/2 loads its state dict)."""
        if self.finish is not None:
            self.finish()


def whole(param: torch.Tensor, data: torch.Tensor | None = None) -> Shard:
    """All of ``param`` (or ``data``, shaped like it) in the parameter's own frame."""
    shape = tuple(param.shape)
    return Shard(param.detach() if data is None else data, shape, (0,) * len(shape))


def replicated_pieces(
    named: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    master: Callable[[nn.Parameter], torch.Tensor] = lambda p: p,
    finish: Callable[[], None] | None = None,
) -> CheckpointPieces:
    """DDP: every parameter and its optimizer state whole. ``master(param)``: the tensor the optimizer
    steps for ``param`` (an fp32 master copy of a 16-bit parameter; the parameter itself by default),
    whose values are saved as the parameter's; ``finish``: what copies loaded masters into the parameters."""
    fill_optimizer_state(optimizer)
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    masters = {name: master(p) for name, p in named.items()}
    unknown = sorted(name for name, m in masters.items() if id(m) not in stepped)
    if unknown:
        raise DataParallelError(f"the optimizer does not step the parameters {unknown[:3]} (or their masters)")
    params = {name: whole(named[name], m.detach()) for name, m in masters.items()}
    optimizer_pieces = {
        name: {k: whole(named[name], v) if _per_element(m, v) else v for k, v in optimizer.state[m].items()}
        for name, m in masters.items()
    }
    return CheckpointPieces(params, optimizer_pieces, finish)


def sharded_optimizer_pieces(named: dict[str, nn.Parameter], optimizer: Any) -> CheckpointPieces:
    """ZeRO-1/2: parameters whole; the :class:`~dp_shard.ShardedOptimizer`'s state dict entries (flat ranges
    of each parameter) without the masters. fp32 masters are the parameters' own elements, so they load
    from the parameters; 16-bit parameters are saved as their fp32 masters, whole (collective: one
    all-reduce for the scalar states, one per group for the masters), which load back into the masters."""
    optimizer.wait_param_gather()
    own = optimizer.state_dict()
    for entry in own["state"].values():
        entry.pop(MASTER, None)
    full = optimizer.full_master_params()
    params = {name: whole(p, full.get(id(p))) for name, p in named.items()}

    def finish() -> None:
        optimizer.load_state_dict(own)
        if full:
            optimizer.load_full_master_params(full)

    return CheckpointPieces(params, dict(own["state"]), finish)


def fully_sharded_pieces(chunks: list[nn.Module], optimizer: torch.optim.Optimizer) -> CheckpointPieces:
    """ZeRO-3: each chunk's flat pieces of its original parameters, and the optimizer's state of them."""
    fill_optimizer_state(optimizer)
    params: dict[str, Shard] = {}
    optimizer_pieces: dict[str, dict[str, Any]] = {}
    for i, chunk in enumerate(chunks):
        params.update({f"chunk{i}.{n}": s for n, s in parameter_shards(chunk).items()})
        optimizer_pieces.update({f"chunk{i}.{n}": s for n, s in optimizer_state_shards(chunk, optimizer).items()})
    return CheckpointPieces(params, optimizer_pieces)


def fill_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter without optimizer state the state its first step would create, zeroed (a
    load target; for AdamW zero moments and ``step`` 0 step exactly as a fresh state does). Which states
    exist is found by stepping the optimizer's class on a two-element dummy, once per param group."""
    options = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    missing = [any(not optimizer.state.get(p) for p in g["params"]) for g in optimizer.param_groups]
    if not any(missing):
        return
    device = next(p.device for g in optimizer.param_groups for p in g["params"])
    kinds = probe_state_kinds(type(optimizer), options, {}, device)
    for group, group_kinds, needed in zip(optimizer.param_groups, kinds, missing):
        for p in group["params"] if needed else ():
            if optimizer.state.get(p):
                continue
            state = optimizer.state[p]
            for name, kind in group_kinds.items():
                if kind.per_element:
                    state[name] = torch.zeros_like(p, dtype=kind.dtype)
                elif kind.is_tensor:
                    state[name] = torch.zeros(kind.shape, dtype=kind.dtype, device=kind.device)
                else:
                    state[name] = 0


def _per_element(param: torch.Tensor, value: Any) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and tuple(value.shape) == tuple(param.shape)

"""``LossScaler``: dynamic loss scaling for fp16 training, over every group that splits the gradients.

fp16 gradients of small values underflow to zero; multiplying the loss by a large scale keeps them
representable, and the optimizer step divides them again. A scale too large makes some gradient inf or
nan: then the step is skipped on every rank and the scale lowered (``backoff_factor``, not below
``min_scale``); after ``growth_interval`` clean steps in a row it is raised (``growth_factor``, not above
``max_scale``). The overflow check is global: the local flag is all-reduced (MAX) over ``groups`` (the
model-parallel groups whose ranks hold different gradients: TP, PP) and the groups the caller adds
(``ShardedOptimizer`` adds its data-parallel group, since each rank holds another gradient shard).

With ``ShardedOptimizer(..., loss_scaler=scaler)``: ``scaler.scale_loss(loss).backward(); opt.step()``.
With ``DataParallel`` and a plain torch optimizer: ``scaler.scale_loss(loss).backward();
ddp.finish_grad_sync(); scaler.step(optimizer)`` (after the sync every replica holds the same gradient,
so the data-parallel group need not be passed).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

import pstate
from pstate import comm

from .errors import DataParallelError


class LossScaler:
    """Dynamic loss scale; ``scale`` is a power-of-two float when the factors are powers of two."""

    def __init__(
        self,
        init_scale: float = 2.0**16,
        *,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
        min_scale: float = 1.0,
        max_scale: float = 2.0**24,
        groups: Sequence[pstate.Group] = (),
    ) -> None:
        if not 0 < min_scale <= init_scale <= max_scale or not math.isfinite(max_scale):
            raise DataParallelError(
                f"need 0 < min_scale <= init_scale <= max_scale < inf, got {min_scale}, {init_scale}, {max_scale}"
            )
        if not growth_factor > 1:
            raise DataParallelError(f"growth_factor={growth_factor} must be > 1")
        if not 0 < backoff_factor < 1:
            raise DataParallelError(f"backoff_factor={backoff_factor} must be in (0, 1)")
        if not (isinstance(growth_interval, int) and growth_interval >= 1):
            raise DataParallelError(f"growth_interval={growth_interval!r} must be an integer >= 1")
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval = growth_interval
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.groups = [pstate.as_group(g) for g in groups]
        self.growth_tracker = 0  # clean steps since the last change of scale

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * scale``: call ``backward()`` on this."""
        return loss * self.scale

    def unscale_(self, grads: Iterable[torch.Tensor | None], *, groups: Sequence[pstate.Group] = ()) -> bool:
        """Divide ``grads`` by the scale in place; return whether any gradient on any rank of
        ``self.groups`` and ``groups`` holds inf or nan (the same answer on every rank)."""
        found = None
        by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for grad in grads:
            if grad is not None and grad.numel():
                by_kind.setdefault((grad.device, grad.dtype), []).append(grad)
        for (device, _), tensors in by_kind.items():  # one fused unscale-and-check per device and dtype
            flag = torch.zeros(1, device=device)
            inverse = torch.full((1,), 1.0 / self.scale, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, flag, inverse)
            found = flag if found is None else torch.maximum(found, flag.to(found.device))
        found = torch.zeros(1) if found is None else found
        for group in (*self.groups, *groups):
            comm.all_reduce(found, op=dist.ReduceOp.MAX, group=group)
        return bool(found.item())

    def update(self, found_inf: bool) -> None:
        """Lower the scale after an overflow; raise it after ``growth_interval`` clean steps."""
        if found_inf:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.growth_tracker = 0
            return
        self.growth_tracker += 1
        if self.growth_tracker >= self.growth_interval:
            self.scale = min(self.scale * self.growth_factor, self.max_scale)
            self.growth_tracker = 0

    def step(self, optimizer: torch.optim.Optimizer, *, groups: Sequence[pstate.Group] = ()) -> bool:
        """For a plain torch optimizer: unscale its parameters' gradients (``main_grad`` where set, as
        ``DataParallel`` does, else ``.grad``), step unless they overflowed, update the scale. Returns
        whether the optimizer stepped."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grads = [getattr(p, "main_grad", None) if getattr(p, "main_grad", None) is not None else p.grad for p in params]
        found_inf = self.unscale_(grads, groups=groups)
        self.update(found_inf)
        if not found_inf:
            optimizer.step()
        return not found_inf

    def state_dict(self) -> dict[str, Any]:
        """The scale and the count of clean steps (plain numbers)."""
        return {"scale": self.scale, "growth_tracker": self.growth_tracker}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        missing = {"scale", "growth_tracker"} - set(state_dict)
        if missing:
            raise DataParallelError(f"a LossScaler state dict needs {sorted(missing)}")
        self.scale = float(state_dict["scale"])
        self.growth_tracker = int(state_dict["growth_tracker"])

"""``clip_grad_norm_``: clip by the norm of the whole model's gradient, however the model is split.

Each gradient element of the full model must be counted exactly once. The caller names the groups:

- ``tp_group``: parameters tagged ``tensor_parallel_dim`` (``tp_layers`` sets it on split weights) hold
  different slices on each TP rank and are summed over the group; untagged parameters are replicated
  across TP and counted on TP rank 0 only.
- ``pp_group`` and ``model_parallel_groups``: groups whose ranks hold *different* gradient elements
  (pipeline stages, expert-parallel ranks, and, for ZeRO-2/3, the data-parallel group over which each
  rank holds its own gradient shard). The local sums are added over each.

- ``ep_group`` and ``etp_group`` (either one turns this on): parameters tagged ``expert_parallel`` are
  counted apart: split over ``etp_group`` when tagged ``tensor_parallel_dim`` (else counted on its rank
  0) and summed over ``ep_group`` (each EP rank holds other experts), so one call covers a model with
  dense and expert layers. Without them expert parameters count like dense ones.
- ``dense_groups`` and ``expert_groups``: like ``model_parallel_groups``, but for the dense or the expert
  parameters only: a ZeRO optimizer shards the dense gradients over the data-parallel group and the
  expert gradients over the expert-data-parallel group. ``expert_groups`` also counts experts apart.

A parameter tagged ``pstate.tags.mark_tied_copy`` (a tied embedding's copy on the last pipeline stage,
whose gradient equals the original's once they are summed) is clipped with the rest but not counted:
the original counts the tensor once.

The data-parallel group of plain DDP is *not* passed: after ``finish_grad_sync()`` every replica holds
the same gradient. Every rank of every group must call this function, even with no gradients.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist

import pstate
from pstate import comm
from pstate.tags import is_expert_parallel, is_tied_copy, tensor_parallel_dim

from .errors import DataParallelError


def clip_grad_norm_(
    params: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    *,
    norm_type: float = 2.0,
    tp_group: pstate.Group | None = None,
    pp_group: pstate.Group | None = None,
    model_parallel_groups: Sequence[pstate.Group] = (),
    ep_group: pstate.Group | None = None,
    etp_group: pstate.Group | None = None,
    dense_groups: Sequence[pstate.Group] = (),
    expert_groups: Sequence[pstate.Group] = (),
    error_if_nonfinite: bool = False,
    eps: float = 1e-6,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Scale the gradients of ``params`` in place so that the global ``norm_type``-norm is at most
    ``max_norm``; return the global norm before clipping (a float32 scalar tensor).

    A parameter's gradient is its ``main_grad`` (set by :class:`~dp_shard.DataParallel`) when it has
    one, else its ``.grad``; parameters without either are skipped; a parameter listed twice counts once.
    Like ``torch.nn.utils.clip_grad_norm_`` the scale is ``max_norm / (norm + eps)`` when below 1. When
    the norm is inf or nan it is returned and the gradients are left untouched (torch would multiply
    them by nan or 0), or :class:`DataParallelError` is raised if ``error_if_nonfinite``.
    ``device`` places the norm when this rank has no gradients (default: the CPU).
    """
    p = float(norm_type)
    if not p > 0:
        raise DataParallelError(f"norm_type={norm_type} must be > 0 (or inf)")
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    experts = ep_group is not None or etp_group is not None or bool(expert_groups)
    dense = [q for q in params if not (experts and is_expert_parallel(q))]
    parts = [(_local_grads(dense, tp_group), (tp_group, pp_group, *model_parallel_groups, *dense_groups))]
    if experts:  # expert weights: split over etp (or replicated there) and spread over ep
        expert = [q for q in params if is_expert_parallel(q)]
        groups = (etp_group, ep_group, pp_group, *model_parallel_groups, *expert_groups)
        parts.append((_local_grads(expert, etp_group), groups))
    grads = [g for part, _ in parts for g in part]
    if grads:
        device = grads[0][0].device
    device = torch.device("cpu") if device is None else device

    op = dist.ReduceOp.MAX if math.isinf(p) else dist.ReduceOp.SUM
    local = torch.zeros((), dtype=torch.float32, device=device)
    for part, groups in parts:
        partial = _partial_norm(part, p, device)
        for group in groups:
            if group is not None:
                comm.all_reduce(partial, op=op, group=group)
        local = torch.maximum(local, partial) if math.isinf(p) else local + partial
    total = local if math.isinf(p) else local ** (1.0 / p)

    if error_if_nonfinite and not torch.isfinite(total).item():
        raise DataParallelError(
            f"the total {norm_type}-norm of the gradients is {total.item()}: not finite, gradients left "
            "as they are (pass error_if_nonfinite=False to get the norm back instead)"
        )
    scale = torch.clamp(max_norm / (total + eps), max=1.0)
    scale = torch.where(torch.isfinite(total), scale, torch.ones_like(scale))
    for (device, dtype), tensors in _by_device_and_dtype(g for g, _ in grads).items():
        torch._foreach_mul_(tensors, scale.to(device=device, dtype=dtype))  # one fused pass per dtype
    return total


def _by_device_and_dtype(tensors: Iterable[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
    """Non-empty ``tensors`` grouped as the fused ``torch._foreach_*`` kernels take them."""
    out: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel():
            out.setdefault((t.device, t.dtype), []).append(t)
    return out


def _partial_norm(grads: list[tuple[torch.Tensor, bool]], p: float, device: torch.device) -> torch.Tensor:
    """This rank's share of the ``p``-norm (its ``p``-th power, or the max for ``inf``)."""
    local = torch.zeros((), dtype=torch.float32, device=device)
    for tensors in _by_device_and_dtype(g for g, counted in grads if counted).values():
        norms = torch.stack(torch._foreach_norm(tensors, p, dtype=torch.float32)).to(device)
        local = torch.maximum(local, norms.max()) if math.isinf(p) else local + norms.pow(p).sum()
    return local


def _local_grads(
    params: torch.Tensor | Iterable[torch.Tensor], tp_group: pstate.Group | None
) -> list[tuple[torch.Tensor, bool]]:
    """Each distinct gradient with whether this rank counts it in the norm."""
    if isinstance(params, torch.Tensor):
        params = [params]
    tp_rank = 0 if tp_group is None else dist.get_rank(pstate.as_group(tp_group))
    seen: set[int] = set()
    grads = []
    for param in params:
        if id(param) in seen:
            continue
        seen.add(id(param))
        grad = getattr(param, "main_grad", None)
        grad = param.grad if grad is None else grad
        if grad is None:
            continue
        split = tensor_parallel_dim(param) is not None
        grads.append((grad, (split or tp_rank == 0) and not is_tied_copy(param)))
    return grads

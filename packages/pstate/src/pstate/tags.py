"""Tags on parameters that say how they are split, read by packages that cannot import each other.

``tp-layers`` and ``moe-dispatch`` set them; ``dp-shard`` (gradient reduction, clipping), ``ckpt`` and
``trainer`` read them. They live here, below all of those, so the attribute names are written once.
"""

from __future__ import annotations

import torch

TENSOR_PARALLEL_DIM = "tensor_parallel_dim"
SEQUENCE_PARALLEL = "sequence_parallel"
EXPERT_PARALLEL = "expert_parallel"
TIED_COPY = "tied_copy"
TAGS = (TENSOR_PARALLEL_DIM, SEQUENCE_PARALLEL, EXPERT_PARALLEL, TIED_COPY)


def mark_tensor_parallel(param: torch.Tensor, dim: int) -> torch.Tensor:
    """Record that ``param`` holds this rank's slice of dimension ``dim`` of the full tensor (over TP)."""
    setattr(param, TENSOR_PARALLEL_DIM, dim)
    return param


def tensor_parallel_dim(param: torch.Tensor) -> int | None:
    """The dimension along which ``param`` is split over TP, or ``None`` when it is replicated."""
    return getattr(param, TENSOR_PARALLEL_DIM, None)


def mark_sequence_parallel(param: torch.Tensor) -> torch.Tensor:
    """Record that ``param`` is replicated over TP but used on a sequence shard (its gradient is partial)."""
    setattr(param, SEQUENCE_PARALLEL, True)
    return param


def is_sequence_parallel(param: torch.Tensor) -> bool:
    """Whether ``param`` was tagged by :func:`mark_sequence_parallel`."""
    return getattr(param, SEQUENCE_PARALLEL, False)


def mark_expert_parallel(param: torch.Tensor) -> torch.Tensor:
    """Record that ``param`` belongs to an expert: its data-parallel reduction uses the ``edp`` group."""
    setattr(param, EXPERT_PARALLEL, True)
    return param


def is_expert_parallel(param: torch.Tensor) -> bool:
    """Whether ``param`` was tagged by :func:`mark_expert_parallel`."""
    return getattr(param, EXPERT_PARALLEL, False)


def mark_tied_copy(param: torch.Tensor) -> torch.Tensor:
    """Record that ``param`` is a copy of a parameter another rank holds (a tied embedding's copy on the
    last pipeline stage): their gradients are summed so they stay equal, and a global gradient norm
    counts the tensor once, at the original (the copy is still clipped with the rest)."""
    setattr(param, TIED_COPY, True)
    return param


def is_tied_copy(param: torch.Tensor) -> bool:
    """Whether ``param`` was tagged by :func:`mark_tied_copy`."""
    return getattr(param, TIED_COPY, False)


def copy_tags(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Give ``target`` (a piece or copy standing for ``source``: a ZeRO master, an FSDP shard) every tag
    ``source`` has, so that clipping and gradient completion treat it as they treat ``source``."""
    for tag in TAGS:
        if hasattr(source, tag):
            setattr(target, tag, getattr(source, tag))
    return target

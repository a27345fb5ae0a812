"""The layer implementation a run asks for (``model.backend``, ``train.precision="fp8"``), put into freshly
built chunks: plain PyTorch leaves them as they are; ``fp8`` on the torch backend turns the transformer
layers' linear layers into torchao fp8 ones (:mod:`.float8`); the ``te`` backend swaps in Transformer
Engine modules (:mod:`.te_backend`, imported only here and only then). Parameters keep their names."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch.distributed as dist
from torch import nn

from .float8 import to_float8
from .groups import ModelGroups


def apply_backend(
    chunks: list[nn.Module],
    groups: ModelGroups,
    *,
    backend: str,
    precision: str,
    fp8_recipe: str,
    amax_group: dist.ProcessGroup | None = None,
) -> Callable[[], AbstractContextManager] | None:
    """Convert ``chunks`` in place; return what each forward must run under (TE's fp8 autocast) or ``None``."""
    if backend == "te":
        from . import te_backend

        te_backend.to_te(chunks, groups)
        return te_backend.fp8_autocast(fp8_recipe, amax_group) if precision == "fp8" else None
    if precision == "fp8":
        to_float8(chunks, fp8_recipe)
    return None

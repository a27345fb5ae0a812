"""Bytes per parameter per rank of each data-parallel mode: the table the measured bytes are checked against.

With ``w`` bytes per model weight, gradients in ``g``-byte main-gradient buffers, ``m``-byte master
weights (0 when the weights are their own masters, e.g. fp32 weights) and ``s`` bytes of optimizer
state per element (AdamW: two fp32 moments, 8), over a data-parallel group of ``d`` ranks:

====== ===================== ==========================================
mode   bytes per parameter   where
====== ===================== ==========================================
DDP    w + g + m + s         everything replicated
ZeRO-1 w + g + (m + s) / d   master and state sharded; the reduced gradient shard lives in the buffer
ZeRO-2 w + (g + m + s) / d   the gradients sharded too (between steps)
ZeRO-3 (w + g + m + s) / d   the weights sharded too
====== ===================== ==========================================

Megatron's mixed precision (16-bit weights, fp32 main gradients, fp32 masters, AdamW) gives the well-known
DDP 18, ZeRO-1 6 + 12/d, ZeRO-2 2 + 16/d and ZeRO-3 18/d; fp32 weights that are their own masters give
16, 8 + 8/d, 4 + 12/d and 16/d. ``dp_shard``'s FSDP keeps fp32 shards that are their own masters (16/d).
"""

from __future__ import annotations

import torch


def bytes_per_param(
    zero: int,
    dp: int,
    *,
    weight_dtype: torch.dtype = torch.bfloat16,
    grad_dtype: torch.dtype = torch.float32,
    master_dtype: torch.dtype | None = torch.float32,
    state_bytes: int = 8,
) -> dict[str, float]:
    """The table's bytes per parameter per rank of ZeRO stage ``zero`` (0: DDP) over ``dp`` ranks, split as
    ``params`` (stored weights), ``grads`` (main-gradient storage), ``optimizer`` (masters and state) and
    ``total``. ``master_dtype=None`` (or equal to ``weight_dtype``): the weights are their own masters."""
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"zero={zero!r}: expected 0, 1, 2 or 3")
    if dp < 1:
        raise ValueError(f"dp={dp} must be >= 1")
    w, g = weight_dtype.itemsize, grad_dtype.itemsize
    m = 0 if master_dtype is None or master_dtype == weight_dtype else master_dtype.itemsize
    params = w / dp if zero == 3 else float(w)
    grads = g / dp if zero >= 2 else float(g)
    optimizer = (m + state_bytes) / dp if zero >= 1 else float(m + state_bytes)
    return {"params": params, "grads": grads, "optimizer": optimizer, "total": params + grads + optimizer}

"""One grouped GEMM for all local experts: ``torch.nn.functional.grouped_mm`` where torch has it.

``grouped_mm(x, w.transpose(1, 2), offs=ends)`` multiplies the rows of group ``i`` (between the
cumulative row counts ``ends[i-1]`` and ``ends[i]``) by ``w[i]^T`` in one call, forward and backward.
In torch 2.13 it runs on CPU for float32, bfloat16 and float16 and on CUDA (SM80+) for bfloat16;
every operand's strides must be multiples of 16 bytes (so the feature sizes must be multiples of
``16 / itemsize``). Where it cannot run, the experts use the per-expert loop (the reference path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GEMMS = ("auto", "grouped", "loop")
CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ACCELERATOR_DTYPES = (torch.bfloat16,)


def available() -> bool:
    """Whether this torch has a grouped GEMM."""
    return hasattr(F, "grouped_mm")


def unsupported_reason(dtype: torch.dtype, device: torch.device, sizes: tuple[int, ...]) -> str | None:
    """Why ``grouped_mm`` cannot run on these weights (``None`` when it can). ``sizes`` are the
    inner dimensions of the operands (the hidden size and each rank's FFN slice)."""
    if not available():
        return f"torch {torch.__version__} has no torch.nn.functional.grouped_mm"
    dtypes = CPU_DTYPES if device.type == "cpu" else ACCELERATOR_DTYPES
    if dtype not in dtypes:
        return f"grouped_mm on {device.type} takes {[str(d) for d in dtypes]}, not {dtype}"
    itemsize = torch.empty((), dtype=dtype).element_size()
    misaligned = [s for s in sizes if (s * itemsize) % 16]
    if misaligned:
        return f"grouped_mm needs feature sizes that are multiples of {16 // itemsize} for {dtype}, got {misaligned}"
    return None


def group_ends(tokens_per_group: list[int], device: torch.device) -> torch.Tensor:
    """The cumulative row counts as the int32 ``offs`` tensor ``grouped_mm`` takes."""
    return torch.tensor(tokens_per_group, dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """``x[rows of group i] @ weight[i]^T`` for every group ``i``, in one call. ``weight`` is
    ``[groups, out, in]`` (``nn.Linear``'s layout per group)."""
    return F.grouped_mm(x.contiguous(), weight.transpose(1, 2), offs=ends)

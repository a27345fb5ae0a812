"""Kernels by name, for configuration files and command lines: ``"auto"``, ``"sdpa"``, ``"math"``."""

from __future__ import annotations

import torch

from .errors import ContextParallelError
from .kernel import AttentionKernel, MathKernel
from .sdpa_kernel import SDPAKernel

KERNEL_NAMES = ("auto", "sdpa", "math")


def make_kernel(name: str, device: torch.device) -> AttentionKernel:
    """The block kernel called ``name`` for tensors on ``device``: ``"sdpa"`` is :class:`SDPAKernel`
    (PyTorch's fused ops), ``"math"`` :class:`MathKernel`, ``"auto"`` the fused one where it runs (CPU and
    CUDA), else the math one. ``ring_attention`` uses ``"auto"`` when given no kernel."""
    if name not in KERNEL_NAMES:
        raise ContextParallelError(f"kernel={name!r}: must be one of {KERNEL_NAMES}")
    if name == "math" or (name == "auto" and not SDPAKernel.available(device)):
        return MathKernel()
    if not SDPAKernel.available(device):
        raise ContextParallelError(f"kernel='sdpa': PyTorch has no fused SDPA op for device {device}; use 'math'")
    return SDPAKernel()

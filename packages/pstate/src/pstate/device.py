"""The one place that knows device names: which device a rank computes on and which backend goes with it."""

from __future__ import annotations

import os

import torch

ACCELERATOR = "cuda"


def default_device() -> torch.device:
    """This process's device: the GPU of ``LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(ACCELERATOR, int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def backend_for(device: torch.device | str) -> str:
    """The collective backend for ``device``: NCCL for CUDA tensors, gloo for CPU tensors."""
    return "nccl" if torch.device(device).type == ACCELERATOR else "gloo"


def device_for_backend(backend: str) -> torch.device:
    """The device whose tensors a default group of ``backend`` communicates."""
    if backend == "nccl":
        return torch.device(ACCELERATOR, torch.cuda.current_device())
    return torch.device("cpu")

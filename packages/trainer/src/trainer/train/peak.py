"""The peak FLOP/s that MFU divides by, and where it came from.

In order: the run's ``train.peak_tflops`` (``--peak-tflops``); on a GPU, the datasheet's dense peak for
the training precision from the planner's hardware profile whose ``device_names`` match the device's
name (one table for both); otherwise a square matmul measured at start-up, labelled as measured. The
measured rate is no peak (a small matmul on a CPU reaches some fraction of what the machine can do),
so an MFU from it compares runs on one machine and nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .flops import measured_matmul_flops

if TYPE_CHECKING:  # plan imports train: imported where used
    from ..plan.hardware import Hardware

#: the dtype a precision's matmuls run in, for the measured fallback (fp8's fallback measures bf16).
MATMUL_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}


@dataclass(frozen=True)
class Peak:
    """One device's peak FLOP/s for the run and its ``source``: ``"override"``, ``"datasheet"`` or
    ``"measured"``; ``detail`` says which figure (the profile and dtype, or what was measured)."""

    flops: float
    source: str
    detail: str

    def describe(self) -> str:
        return f"{self.flops / 1e12:,.1f} TFLOP/s per device ({self.source}: {self.detail})"


def match_hardware(device_name: str) -> Hardware | None:
    """The packaged hardware profile whose ``device_names`` include a substring of ``device_name``
    (case-insensitive; the longest match wins), or ``None``."""
    from ..plan.hardware import known_hardware, load_hardware

    name, best, found = device_name.lower(), 0, None
    for profile in known_hardware():
        hw = load_hardware(profile)
        for pattern in hw.device_names:
            if pattern.lower() in name and len(pattern) > best:
                best, found = len(pattern), hw
    return found


def device_peak(device: torch.device, precision: str, override_tflops: float | None = None) -> Peak:
    """The peak for MFU on ``device`` when training in ``precision`` (see the module's order)."""
    if override_tflops is not None:
        return Peak(override_tflops * 1e12, "override", "train.peak_tflops")
    if device.type != "cpu" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
        hw = match_hardware(name)
        if hw is not None:
            return Peak(hw.peak_flops(precision), "datasheet", f"{hw.name} dense {hw.peak_dtype(precision)}")
        label = f"{name} has no hardware profile; set train.peak_tflops"
    else:
        label = "CPU"
    dtype = MATMUL_DTYPE[precision]
    rate = measured_matmul_flops(dtype, device)
    detail = f"{label}: {rate.n}^3 {str(dtype).removeprefix('torch.')} matmul at start-up"
    return Peak(rate.flops, "measured", detail)

"""The fused unscale-and-check and clipping (one multi-tensor pass per dtype) give the same bits in fp32
as the same math done parameter by parameter (the per-parameter versions live beside the benchmark that
times the two)."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from dp_shard import LossScaler, clip_grad_norm_

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench_fused_step.py"


def bench():
    spec = importlib.util.spec_from_file_location("bench_fused_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("max_norm", [1.0, 1e9])  # clipping, and a norm under the bound
def test_fused_clipping_equals_the_per_parameter_version_bit_for_bit(norm_type, max_norm):
    b = bench()
    fused, reference = b.gradients(1000), b.gradients(1000)
    norm = clip_grad_norm_(b.holders(fused), max_norm, norm_type=norm_type)
    assert torch.equal(norm, b.per_parameter_clip(reference, max_norm, norm_type))
    assert all(torch.equal(f, r) for f, r in zip(fused, reference))
    assert (norm > max_norm) == (max_norm == 1.0)  # the clipping case clips


@pytest.mark.parametrize("bad", [None, math.inf, math.nan])
def test_fused_unscaling_and_its_overflow_check_equal_the_per_parameter_version(bad):
    b = bench()
    fused, reference = b.gradients(1000), b.gradients(1000)
    if bad is not None:
        fused[517].view(-1)[3] = reference[517].view(-1)[3] = bad
    found = LossScaler(2.0**13).unscale_(fused)
    assert found == b.per_parameter_unscale(reference, 2.0**13) == (bad is not None)
    for f, r in zip(fused, reference):
        torch.testing.assert_close(f, r, rtol=0, atol=0, equal_nan=True)

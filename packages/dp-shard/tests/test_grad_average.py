"""The data-parallel average costs no pass over the gradients of its own, and equals dividing the sums.

At world 4 (a power of two, so dividing before or after the sum, or scaling the loss, gives the same
bits: scaling by 2**-k is exact) every mode reduces the gradients of a small MLP over 2 micro-batches
three ways: ``average=False`` (sums reduced, the loss multiplied by ``engine.loss_factor``: what the
trainer does), the engine's own average (folded into a copy that happens anyway where there is one), and
the reference: the summed reduction divided by 4 afterwards, which for this divisor is bit for bit what
dividing each rank's gradients before the reduction gave. Gradients must be equal bit for bit.

The division passes are counted with a dispatch mode over the backward and ``finish_grad_sync``: every
``div``/``mul`` whose result has as many elements as a gradient piece or more and keeps its input's dtype
(a cast that divides on the way is not a pass of its own). With ``average=False`` there are none in any
mode. The engine's own average: none where gradients reach the bucket through a hook (ZeRO-2) or are cast
for the collective (a bf16 reduction); ZeRO-3 and HSDP divide the reduced shard only (1/4 of the
gradient); fp32 DDP and ZeRO-1, whose buckets autograd fills in place, keep one pass (what the loss
scaling avoids).
"""

from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dp_shard import make_engine

WORLD, MICRO, HIDDEN, LAYERS = 4, 2, 32, 3
PIECE = 256  # at least a quarter of a layer's gradient; activations (4 x 32) stay below
P = LAYERS * (HIDDEN + 1) * HIDDEN
MODES = {
    "ddp": dict(zero=0),
    "ddp-bf16-reduce": dict(zero=0, reduce_dtype=torch.bfloat16),
    "zero1": dict(zero=1),
    "zero2": dict(zero=2),
    "zero2-reduce-scatter": dict(zero=2, collectives="reduce_scatter"),
    "zero3": dict(zero=3),
    "hsdp": dict(zero=3, hsdp=True),
}
# elements the engine's own average divides in a pass of its own (None: not checked)
OWN_PASS = {"ddp-bf16-reduce": 0, "zero2": 0, "zero2-reduce-scatter": 0, "zero3": P // WORLD, "hsdp": P // 2}


class DivisionCounter(TorchDispatchMode):
    """Elements written by same-dtype ``div``/``mul`` ops over at least ``PIECE`` elements."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        divides = name in ("div", "div_", "mul", "mul_") and torch.is_tensor(out) and out.numel() >= PIECE
        if divides and torch.is_tensor(args[0]) and args[0].dtype == out.dtype:
            self.elements += out.numel()
        return out


def net() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(*[nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh()) for _ in range(LAYERS)])


def _groups(ranks: list[list[int]]) -> dist.ProcessGroup:
    mine = None
    for members in ranks:
        group = dist.new_group(members)
        if dist.get_rank() in members:
            mine = group
    return mine


def grads(mode: str, how: str, world: int = WORLD):
    options = dict(MODES[mode])
    zero, hsdp = options.pop("zero"), options.pop("hsdp", False)
    group, replicas = (_groups([[0, 1], [2, 3]]), _groups([[0, 2], [1, 3]])) if hsdp else (dist.group.WORLD, None)
    if zero == 3:
        options["units"] = lambda chunk: list(chunk)
        options["replicate_group"] = replicas
    engine = make_engine(
        zero,
        [net()],
        group=group,
        param_groups=lambda named: [{"params": list(named.items())}],
        optimizer_cls=torch.optim.SGD,
        average=how == "engine",
        lr=0.1,
        **options,
    )
    factor = engine.loss_factor if how == "loss" else 1.0
    counter = DivisionCounter()
    engine.zero_grad()
    for m in range(MICRO):
        x = torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(10 * dist.get_rank() + m))
        with engine.no_sync(0) if m < MICRO - 1 else nullcontext():
            loss = engine.modules[0](x).square().mean()
            with counter:
                (loss * factor).backward()
    with counter:
        engine.finish_grad_sync()
    reduced = [g.detach().clone() for g in engine.main_grads() if g is not None]
    if how == "sum":
        reduced = [g / world for g in reduced]
    return reduced, counter.elements, engine.loss_factor


@pytest.mark.parametrize("mode", list(MODES))
def test_average_costs_no_pass_and_equals_dividing_the_sums(run_ranks, mode):
    results = {how: run_ranks(WORLD, grads, mode, how) for how in ("loss", "engine", "sum")}
    for rank in range(WORLD):
        reference, _, _ = results["sum"][rank]
        for how in ("loss", "engine"):
            got, _, _ = results[how][rank]
            assert len(got) == len(reference)
            for a, b in zip(got, reference):
                assert torch.equal(a, b), (how, rank)
        assert results["loss"][rank][1] == 0  # no division pass at all
        assert results["loss"][rank][2] == 1 / WORLD
        assert results["engine"][rank][2] == 1.0
        if OWN_PASS.get(mode) is not None:
            assert results["engine"][rank][1] <= OWN_PASS[mode]


def test_counter_sees_the_division_pass_of_fp32_ddp(run_ranks):
    """What the counter measures: fp32 DDP's own average divides every gradient element in place (the one
    pass left; the trainer's loss scaling avoids it)."""
    for _, elements, _ in run_ranks(WORLD, grads, "ddp", "engine"):
        assert elements == P


@pytest.mark.parametrize("mode", ["ddp", "zero2", "zero3"])
def test_a_divisor_of_three_agrees_to_rounding(run_ranks, mode):
    """At world 3 ``g * (1/3)`` and ``g / 3`` may round apart, and scaling the loss rounds every backward
    op on other values: the ways agree to fp32 rounding (``torch.testing``'s fp32 default)."""
    results = {how: run_ranks(3, grads, mode, how, 3) for how in ("loss", "engine", "sum")}
    for rank in range(3):
        for how in ("loss", "engine"):
            for a, b in zip(results[how][rank][0], results["sum"][rank][0], strict=True):
                torch.testing.assert_close(a, b)

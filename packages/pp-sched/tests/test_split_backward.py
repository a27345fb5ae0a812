"""The split backward (``input_backward`` then ``WeightGradient.run``) against one plain backward.

Single process, real autograd. Tolerance: ``torch.testing``'s float32 default; the split computes the same
products as the plain backward, grouped differently, so only the last bits may differ.
"""

import pytest
import torch
from torch import nn

from pp_sched.split_backward import SavedTensors, input_backward


class Block(nn.Module):
    """LayerNorm, Linear, GELU, Linear, a residual scaled by a parameter."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm, self.up, self.down = (
            nn.LayerNorm(hidden),
            nn.Linear(hidden, 4 * hidden),
            nn.Linear(4 * hidden, hidden),
        )
        self.scale = nn.Parameter(torch.randn(hidden))

    def forward(self, x):
        return self.down(nn.functional.gelu(self.up(self.norm(x)))) + x * self.scale


class Shared(nn.Module):
    """One Linear applied twice: its weight has two joins on one path."""

    def __init__(self, hidden: int):
        super().__init__()
        self.layer = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.layer(torch.tanh(self.layer(x)))


def models():
    torch.manual_seed(0)
    return {
        "mlp": nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)),
        "blocks": nn.Sequential(Block(8), Block(8)),
        "shared": Shared(8),
    }


@pytest.mark.parametrize("name", ["mlp", "blocks", "shared"])
@pytest.mark.parametrize("first_stage", [False, True])
def test_i_gives_only_the_input_gradient_and_w_the_weight_gradients(name, first_stage):
    model = models()[name]
    x = torch.randn(3, 8)
    grad = torch.randn(3, 8)
    params = list(model.parameters())
    inputs = [] if first_stage else [x.clone().requires_grad_()]
    ref_x = None if first_stage else torch.autograd.grad(model(inputs[0]), inputs, grad)[0]
    ref_params = torch.autograd.grad(model(x), params, grad)

    saved = SavedTensors()
    with saved.recording():
        out = model(*(inputs or [x]))
    input_grads, weights = input_backward([out], [grad], inputs, saved)
    assert all(p.grad is None for p in params)  # I touches no parameter gradient
    if not first_stage:
        torch.testing.assert_close(input_grads[0], ref_x)
        assert inputs[0].grad is None
    del out
    weights.run()
    for p, ref in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p.grad, ref)
    weights.run()  # a second run does nothing: everything was dropped
    for p, ref in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p.grad, ref)


def test_w_accumulates_into_existing_gradients_and_fires_accumulate_hooks():
    model = models()["mlp"]
    x, grad = torch.randn(3, 8), torch.randn(3, 8)
    ref = torch.autograd.grad(model(x), list(model.parameters()), grad)
    calls = []
    for p in model.parameters():
        p.grad = torch.ones_like(p)
        p.register_post_accumulate_grad_hook(lambda p: calls.append(p))
    _, weights = input_backward([model(x)], [grad], [])
    weights.run()
    assert len(calls) == 4
    for p, r in zip(model.parameters(), ref, strict=True):
        torch.testing.assert_close(p.grad, r + 1)


def test_after_i_only_what_w_needs_stays_saved():
    """GELU saves its input, used only for the input gradient: it is dropped after I. The Linear inputs
    (what W multiplies the captured gradients with) stay."""
    torch.manual_seed(0)
    up, down = nn.Linear(8, 32), nn.Linear(32, 8)
    x = torch.randn(3, 8, requires_grad=True)
    saved = SavedTensors()
    with saved.recording():
        hidden = up(x)
        activated = nn.functional.gelu(hidden)
        out = down(activated)
    before = {id(t) for t in saved.tensors()}
    assert id(hidden) in before and id(activated) in before
    _, weights = input_backward([out], [torch.ones_like(out)], [x], saved)
    after = {id(t) for t in saved.tensors()}
    assert id(hidden) not in after  # GELU's input: input gradient only
    assert id(activated) in after and id(x) in after  # the Linear inputs W needs
    weights.run()
    assert up.weight.grad is not None and down.weight.grad is not None

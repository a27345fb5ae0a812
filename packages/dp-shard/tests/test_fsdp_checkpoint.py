"""Parameter and AdamW state of a ``fully_shard`` ed model as ``pstate.Shard`` s, resharded from DP=2 to DP=4.

A DP=2 run trains ``STEPS`` steps and returns its ``parameter_shards`` and ``optimizer_state_shards``.
This process reassembles global tensors from the Shards alone (each piece written at its flat range;
every element must be covered exactly once) and compares them with the single-process model and its
AdamW state after the same steps. A DP=4 run, built from another seed so that only loading can make
it right, loads those global tensors and trains ``MORE`` steps on four ranks' batches; its parameters
must equal the single-process model trained on the two-rank batches and then on the four-rank ones.

Tolerance: ``torch.testing``'s float32 default (rtol 1.3e-6, atol 1e-5), as in ``test_fully_shard``:
only the order in which ranks' gradients are added differs.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dp_shard.errors import DataParallelError
from dp_shard.fully_shard import (
    fully_shard,
    load_optimizer_state_shards,
    load_parameter_shards,
    optimizer_state_shards,
    parameter_shards,
)
from pstate import Shard

SEED, BATCH, IN, HIDDEN, STEPS, MORE = 21, 4, 5, 10, 2, 2


def build(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))


def optimizer_for(model: nn.Module) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=1e-2)


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(50 * step + rank)
    return torch.randn(BATCH, IN, generator=generator), torch.randn(BATCH, 1, generator=generator)


def train(model, optimizer, steps, world, rank=None):
    """``rank=None``: one process on all ``world`` ranks' batches; else this rank's batch."""
    for step in steps:
        ranks = range(world) if rank is None else [rank]
        sum(F.mse_loss(model(x), y) for x, y in (batch(r, step) for r in ranks)).div(len(ranks)).backward()
        optimizer.step()
        optimizer.zero_grad()


def sharded(seed: int):
    model = fully_shard(build(seed), group=dist.group.WORLD, units=nn.Linear)  # the root holds nothing
    return model, optimizer_for(model)


def save_at_dp2():
    model, optimizer = sharded(SEED)
    train(model, optimizer, range(STEPS), 2, dist.get_rank())
    return parameter_shards(model), optimizer_state_shards(model, optimizer)


def resume_at_dp4(params: dict[str, torch.Tensor], state: dict[str, dict]):
    model, optimizer = sharded(SEED + 1)
    load_parameter_shards(model, {n: Shard(t, tuple(t.shape), (0,) * t.dim()) for n, t in params.items()})
    whole = {
        n: {k: Shard(v, tuple(v.shape), (0,) * v.dim()) if k.startswith("exp_avg") else v for k, v in entries.items()}
        for n, entries in state.items()
    }
    load_optimizer_state_shards(model, optimizer, whole)
    train(model, optimizer, range(STEPS, STEPS + MORE), 4, dist.get_rank())
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assemble(pieces: list[Shard]) -> torch.Tensor:
    shape = pieces[0].global_shape
    flat, count = torch.zeros(shape).reshape(-1), torch.zeros(shape, dtype=torch.int64).reshape(-1)
    for piece in pieces:
        assert piece.global_shape == shape and piece.offsets == (0,) * len(shape) and piece.shape == shape
        start, stop = piece.flat_range
        flat[start:stop] = piece.data
        count[start:stop] += 1
    assert torch.equal(count, torch.ones_like(count)), "the pieces do not cover the tensor exactly once"
    return flat.view(shape)


def test_reshard_parameters_and_adamw_state_from_dp2_to_dp4(run_ranks):
    saved = run_ranks(2, save_at_dp2)
    reference = build(SEED)
    optimizer = optimizer_for(reference)
    train(reference, optimizer, range(STEPS), 2)

    params = {n: assemble([s[0][n] for s in saved]) for n, _ in reference.named_parameters()}
    state = {}
    for name, param in reference.named_parameters():
        expected = optimizer.state[param]
        entries = [s[1][name] for s in saved]
        state[name] = {"step": entries[0]["step"]}
        assert all(torch.equal(e["step"], expected["step"]) for e in entries)
        for key in ("exp_avg", "exp_avg_sq"):
            state[name][key] = assemble([e[key] for e in entries])
            torch.testing.assert_close(state[name][key], expected[key])
        torch.testing.assert_close(params[name], param.detach())

    resumed = run_ranks(4, resume_at_dp4, params, state)
    train(reference, optimizer, range(STEPS, STEPS + MORE), 4)
    for name, param in reference.named_parameters():
        full = torch.cat([r[name] for r in resumed]).view(param.shape)
        torch.testing.assert_close(full, param.detach(), msg=lambda m, n=name: f"{n}: {m}")


def bad_loads():
    model, optimizer = sharded(SEED)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    good = parameter_shards(model)
    weight = good["0.weight"]
    wrong_shape = dict(good, **{"0.weight": Shard(torch.zeros(3, 3), (3, 3), (0, 0))})
    rectangle = dict(good, **{"0.weight": Shard(torch.zeros(2, IN), (HIDDEN, IN), (0, 0))})
    elsewhere = dict(good, **{"0.weight": Shard(torch.zeros(1), (HIDDEN, IN), (0, 0), (HIDDEN, IN), (49, 50))})
    missing = {n: s for n, s in good.items() if n != "2.bias"}
    messages = [
        *(
            _error(lambda s=shards: load_parameter_shards(model, s))
            for shards in (wrong_shape, rectangle, elsewhere, missing)
        ),
        _error(lambda: load_optimizer_state_shards(model, optimizer, {"0.weight": {}})),
        _error(lambda: parameter_shards(nn.Linear(2, 2))),
    ]
    unchanged = all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    return messages, unchanged, weight.flat_range


def _error(call):
    try:
        call()
    except DataParallelError as error:
        return str(error)
    return None


def test_bad_loads_are_clear_errors_and_write_nothing(run_ranks):
    for rank, (messages, unchanged, flat_range) in enumerate(run_ranks(2, bad_loads)):
        assert unchanged
        assert flat_range == [(0, 30), (30, 50)][rank]
        assert "global shape [3, 3], the parameter [10, 5]" in messages[0]
        assert "rectangle at [0, 0] of shape [2, 5]" in messages[1]
        assert f"needs elements [{flat_range[0]}, {flat_range[1]})" in messages[2]
        assert "holds [49, 50)" in messages[2]
        assert "missing ['2.bias']" in messages[3]
        assert "load_optimizer_state_shards" in messages[4] and "missing ['0.bias', '2.bias'" in messages[4]
        assert "was not passed to fully_shard()" in messages[5]

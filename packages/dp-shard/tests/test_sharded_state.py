"""``ShardedOptimizer.state_dict()`` reshards from DP=2 to DP=4 without ``ckpt``.

DP=2 trains ``STEPS`` AdamW steps and returns its state dict. The test assembles each parameter's
global state from the two ranks' ``Shard`` s (``flat_range`` into the flattened parameter) and checks
(a) it equals the single-process AdamW's state (moments, ``step``) and the master weights equal its
parameters, and that every element was covered exactly once; (b) a fresh DP=4 optimizer, its own
``state_dict()`` filled from those global tensors (as ``ckpt`` does) and loaded, takes one more step
equal to the single-process run's next step, with the parameters restored from the masters. Tolerance:
the float32 default, as in ``test_sharded_optimizer.py`` (summation order only).
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dp_shard import DataParallelError, ShardedOptimizer
from pstate import Shard

SEED, BATCH, IN, HIDDEN, STEPS = 1234, 4, 6, 8, 2


def net() -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(
        nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN)
    )


def groups(model, named=False):
    """Weights with decay and lr 1e-2, biases without and lr 5e-3."""

    def pick(bias):
        return [(n, p) if named else p for n, p in model.named_parameters() if n.endswith("bias") == bias]

    return [
        {"params": pick(False), "weight_decay": 0.1, "lr": 1e-2},
        {"params": pick(True), "weight_decay": 0.0, "lr": 5e-3},
    ]


def batch(rank, step, micro):
    generator = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    return torch.randn(BATCH, IN, generator=generator), torch.randn(BATCH, HIDDEN, generator=generator)


def make(stage):
    model = net()
    optimizer = ShardedOptimizer(
        groups(model, named=True), torch.optim.AdamW, group=dist.group.WORLD, stage=stage, bucket_size_mb=1e-4
    )
    return model, optimizer


def one_step(model, optimizer, step, ranks):
    x, y = batch(ranks[dist.get_rank()], step, 0)
    F.mse_loss(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad()


def plain(state_dict):
    """The state dict with each Shard as (global_shape, offsets, shape, flat_range, data) to send back."""
    out = {}
    for key, entry in state_dict["state"].items():
        out[key] = {
            name: (v.global_shape, v.offsets, v.shape, v.flat_range, v.data.clone())
            if isinstance(v, Shard)
            else v.clone()
            for name, v in entry.items()
        }
    return out, state_dict["param_groups"]


def train_dp2():
    model, optimizer = make(stage=1)
    for step in range(STEPS):
        one_step(model, optimizer, step, [0, 1])
    return plain(optimizer.state_dict())


def assemble(results):
    """Global per-parameter tensors from the ranks' Shards; counts how often each element was given."""
    merged, cover = {}, {}
    for state, _ in results:
        for key, entry in state.items():
            for name, value in entry.items():
                if not isinstance(value, tuple):
                    merged.setdefault(key, {})[name] = value
                    continue
                global_shape, offsets, shape, (start, stop), data = value
                assert offsets == (0,) * len(global_shape) and shape == global_shape
                flat = merged.setdefault(key, {}).setdefault(name, torch.zeros(global_shape).reshape(-1))
                flat[start:stop] = data
                count = cover.setdefault((key, name), torch.zeros(flat.numel()))
                count[start:stop] += 1
    for key, entry in merged.items():
        for name, value in entry.items():
            if value.dim() == 1 and (key, name) in cover:
                entry[name] = value.reshape(results[0][0][key][name][0])
    return merged, cover


def load_dp4_and_step(merged, masters_from_model=False):
    """Fill a DP=4 optimizer's state dict from the global tensors and load it; with
    ``masters_from_model`` the weights go into the model and the entries carry no ``master_param``."""
    model, optimizer = make(stage=2)
    state_dict = optimizer.state_dict()
    if masters_from_model:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for key in state_dict["state"]:
                params[key].copy_(merged[key]["master_param"])
                del state_dict["state"][key]["master_param"]
    for key, entry in state_dict["state"].items():
        for name, value in entry.items():
            full = merged[key][name]
            if isinstance(value, Shard):
                start, stop = value.flat_range
                value.data.copy_(full.reshape(-1)[start:stop])
            else:
                value.copy_(full)
    optimizer.load_state_dict(state_dict)
    restored = [p.detach().clone() for p in model.parameters()]
    one_step(model, optimizer, STEPS, [0, 1, 2, 3])
    return restored, [p.detach().clone() for p in model.parameters()]


def reference():
    model = net()
    optimizer = torch.optim.AdamW(groups(model))
    history = []
    for step in range(STEPS + 1):
        ranks = [0, 1] if step < STEPS else [0, 1, 2, 3]
        history.append([p.detach().clone() for p in model.parameters()])
        loss = sum(F.mse_loss(model(batch(r, step, 0)[0]), batch(r, step, 0)[1]) for r in ranks) / len(ranks)
        loss.backward()
        if step == STEPS:
            break
        optimizer.step()
        optimizer.zero_grad()
        state = {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in model.named_parameters()}
    optimizer.step()
    return history[-1], state, [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("masters_from_model", [False, True])
def test_dp2_state_assembles_to_the_single_process_state_and_loads_into_dp4(run_ranks, masters_from_model):
    before_last, state, after = reference()
    merged, cover = assemble(run_ranks(2, train_dp2))
    assert all(bool((c == 1).all()) for c in cover.values())  # each element held by exactly one rank
    for (name, expected), param in zip(state.items(), before_last):
        torch.testing.assert_close(merged[name]["master_param"], param)
        torch.testing.assert_close(merged[name]["exp_avg"], expected["exp_avg"])
        torch.testing.assert_close(merged[name]["exp_avg_sq"], expected["exp_avg_sq"])
        assert merged[name]["step"].item() == expected["step"].item() == STEPS
    for restored, stepped in run_ranks(4, load_dp4_and_step, merged, masters_from_model):
        for got, want in zip(restored, before_last):
            torch.testing.assert_close(got, want)
        for got, want in zip(stepped, after):
            torch.testing.assert_close(got, want)


def template():
    _, optimizer = make(stage=1)
    state_dict = optimizer.state_dict()
    entry = state_dict["state"]["2.weight"]
    form = {name: (v.flat_range, v.data.numel()) if isinstance(v, Shard) else v.item() for name, v in entry.items()}
    bad = Shard(torch.zeros(3), (8, 8), (0, 0), (8, 8), (0, 3))
    broken = {**state_dict, "state": {**state_dict["state"], "2.weight": {**entry, "exp_avg": bad}}}
    try:
        optimizer.load_state_dict(broken)
    except DataParallelError as error:
        return form, state_dict["param_groups"][1], str(error)
    return form, state_dict["param_groups"][1], None


def test_a_fresh_state_dict_has_every_entry_and_bad_shards_are_refused(run_ranks):
    results = run_ranks(2, template)
    # buckets (reverse of the order given): the three biases and 4.weight; 2.weight alone, split in halves
    assert [form["exp_avg"] for form, _, _ in results] == [((0, 32), 32), ((32, 64), 32)]
    for form, hyper, error in results:
        assert set(form) == {"master_param", "exp_avg", "exp_avg_sq", "step"}
        assert form["step"] == 0.0 and form["master_param"] == form["exp_avg"]
        assert hyper == {**hyper, "lr": 5e-3, "weight_decay": 0.0, "params": ["0.bias", "2.bias", "4.bias"]}
        assert "'exp_avg' of parameter '2.weight' covers elements (0, 3)" in error


@pytest.mark.parametrize("stage", [1, 2])
def test_state_dict_round_trip_keeps_training_identical(run_ranks, stage):
    first, second = run_ranks(2, round_trip, stage)[0]
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def round_trip(stage):
    model, optimizer = make(stage)
    one_step(model, optimizer, 0, [0, 1])
    saved = optimizer.state_dict()
    saved = {**saved, "state": {k: {n: _copy(v) for n, v in e.items()} for k, e in saved["state"].items()}}
    one_step(model, optimizer, 1, [0, 1])
    first = [p.detach().clone() for p in model.parameters()]
    model, optimizer = make(stage)
    optimizer.load_state_dict(saved)
    one_step(model, optimizer, 1, [0, 1])
    return first, [p.detach().clone() for p in model.parameters()]


def _copy(value):
    if isinstance(value, Shard):
        return Shard(value.data.clone(), value.global_shape, value.offsets, value.shape, value.flat_range)
    return value.clone()

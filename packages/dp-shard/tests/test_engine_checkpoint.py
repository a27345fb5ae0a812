"""``DataParallelEngine.checkpoint_pieces``: one form for every mode, so each of DDP, ZeRO-1, ZeRO-2 and
ZeRO-3 loads what any other saved.

At world 2 (one spawn for all 16 pairs) an engine of each mode takes a step; its pieces are assembled
into whole tensors (a flat range summed over the group into zeros) as a checkpoint would hold them.
A fresh engine of each mode is filled from them (its own pieces cut from the whole tensors, then
``finish_load``), and reading its pieces back gives the same whole tensors exactly (a copy loses
nothing). Then it takes the second step and must hold the parameters the saving mode holds after two
uninterrupted steps (``torch.testing``'s fp32 default: the modes reduce in other orders).
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dp_shard import ClipGroups, make_engine

MODES = (0, 1, 2, 3)


def engine_of(zero: int):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
    return make_engine(
        zero,
        [model],
        group=dist.group.WORLD,
        param_groups=lambda named: [{"params": list(named.items()), "weight_decay": 0.1}],
        optimizer_cls=torch.optim.AdamW,
        units=lambda chunk: [chunk[0], chunk[2]],
        lr=1e-2,
    )


def step(engine, number: int) -> None:
    g = torch.Generator().manual_seed(10 * number + dist.get_rank())
    x, y = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    engine.zero_grad()
    F.mse_loss(engine.modules[0](x), y).backward()
    engine.finish_grad_sync()
    assert not engine.step(1.0, ClipGroups())[1]


def whole(value):
    """A piece as the whole tensor (a flat range summed over the group into zeros); a scalar as it is."""
    if not hasattr(value, "global_shape"):
        return value.detach().clone() if torch.is_tensor(value) else value
    if value.flat_range is None:
        return value.data.detach().clone()
    full = torch.zeros(value.global_shape).reshape(-1)
    full[value.flat_range[0] : value.flat_range[1]] = value.data
    dist.all_reduce(full)
    return full.view(value.global_shape)


def saved(engine) -> dict:
    pieces = engine.checkpoint_pieces()
    out = {("param", n): whole(s) for n, s in pieces.params.items()}
    for name, states in pieces.optimizer.items():
        out.update({(name, k): whole(v) for k, v in states.items()})
    return out


def fill(target, full) -> None:
    """Cut ``target`` (a piece or a scalar tensor) out of the whole tensor ``full``, in place."""
    if not hasattr(target, "global_shape"):
        target.copy_(full)
    elif target.flat_range is None:
        target.data.copy_(full)
    else:
        target.data.copy_(full.reshape(-1)[target.flat_range[0] : target.flat_range[1]])


def load(engine, state: dict) -> None:
    pieces = engine.checkpoint_pieces()
    for name, shard in pieces.params.items():
        fill(shard, state[("param", name)])
    for name, states in pieces.optimizer.items():
        for key, value in states.items():
            fill(value, state[(name, key)])
    pieces.finish_load()


def every_pair():
    out = {}
    for first in MODES:
        engine = engine_of(first)
        step(engine, 0)
        state = saved(engine)
        step(engine, 1)
        expected = {n: whole(s) for n, s in engine.checkpoint_pieces().params.items()}
        for second in MODES:
            resumed = engine_of(second)
            load(resumed, state)
            back = saved(resumed)
            differing = sorted(k for k in state if not torch.equal(torch.as_tensor(back[k]), torch.as_tensor(state[k])))
            step(resumed, 1)
            after = {n: whole(s) for n, s in resumed.checkpoint_pieces().params.items()}
            out[(first, second)] = (set(back) == set(state), differing, expected, after)
    return out


@pytest.fixture(scope="module")
def pairs(rank_harness):
    return rank_harness.run(2, every_pair)


@pytest.mark.parametrize("first", MODES)
def test_each_mode_loads_what_any_mode_saved(pairs, first):
    for rank, result in enumerate(pairs):
        for second in MODES:
            keys_match, differing, expected, after = result[(first, second)]
            assert keys_match, f"rank {rank}: zero {first} -> {second}: other state keys"
            assert not differing, f"rank {rank}: zero {first} -> {second}: {differing} differ after loading"
            assert expected.keys() == after.keys()
            for name in expected:
                torch.testing.assert_close(
                    after[name], expected[name], msg=lambda m, n=f"{first}->{second} {name}": f"{n}: {m}"
                )

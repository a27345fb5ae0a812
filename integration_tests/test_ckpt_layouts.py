"""A tensor-parallel MLP stack (``tp_layers``) saved at one layout loads at another and computes what
the single-process model computes.

Layers are keyed by their global number (layer ``i`` is layer ``i`` on whatever pipeline stage holds
it); each weight is described with ``pstate.tensor_parallel_shard`` and the ``tensor_parallel_dim``
tag. The saving model is drawn from one seed, the loading model from another (so a load that did
nothing fails), and the reference is the TP=1 model from the saving seed. Weights must be equal
exactly (loading moves bytes); layer outputs within ``rtol=1e-5, atol=1e-6`` in fp32, because a
row-parallel layer sums TP partial products in another order than one matmul does.
"""

import pytest
import torch
import torch.distributed as dist

import ckpt
import pstate
from pstate import ParallelConfig, tags, tensor_parallel_shard
from tp_layers import ColumnParallelLinear, RowParallelLinear

LAYERS, HIDDEN, FFN = 4, 8, 16


def build(index, seed, group):
    """Layer ``index``: column-parallel up-projection, GELU, row-parallel down-projection."""
    up = ColumnParallelLinear(HIDDEN, FFN, group=group, seed=seed + 2 * index)
    down = RowParallelLinear(FFN, HIDDEN, group=group, seed=seed + 2 * index + 1)
    return torch.nn.ModuleDict({"up": up, "down": down})


def forward(layer, x):
    return layer["down"](torch.nn.functional.gelu(layer["up"](x)))


def state_of(layers, tp):
    """The checkpoint state of this rank's layers: every parameter as its piece of the full tensor."""
    return {
        "layers": {
            i: {
                name: tensor_parallel_shard(p.data, tags.tensor_parallel_dim(p), tp.rank, tp.size)
                for name, p in layer.named_parameters()
            }
            for i, layer in layers.items()
        },
        "step": 40,
    }


def stage_layers(ps):
    per = LAYERS // ps.pp.size
    return range(ps.pp.rank * per, (ps.pp.rank + 1) * per)


def save_at(path, tp, pp):
    with pstate.initialize(ParallelConfig(tp=tp, pp=pp)) as ps:
        layers = {i: build(i, 1000, ps.tp) for i in stage_layers(ps)}
        ckpt.save(state_of(layers, ps.tp), path, layout=ParallelConfig(tp=tp, pp=pp, dp=ps.dp.size))


def load_at(path, tp, pp):
    """Load into a differently seeded model at ``tp``/``pp``; compare with the TP=1 saving model."""
    with pstate.initialize(ParallelConfig(tp=tp, pp=pp)) as ps:
        layers = {i: build(i, 7, ps.tp) for i in stage_layers(ps)}
        state = ckpt.load(state_of(layers, ps.tp), path, group=ps.world)
        assert state["step"] == 40
        # one-rank groups (made by every rank, in the same order): each rank's single-process reference
        alone = [dist.new_group([r]) for r in range(dist.get_world_size())][dist.get_rank()]
        checked = 0
        for i, layer in layers.items():
            ref = build(i, 1000, alone)
            for name, p in layer.named_parameters():
                full = ref.get_parameter(name).data
                dim = tags.tensor_parallel_dim(p)
                want = full if dim is None else full.chunk(ps.tp.size, dim)[ps.tp.rank]
                assert torch.equal(p.data, want), (i, name)
            x = torch.randn(5, 2, HIDDEN, generator=torch.Generator().manual_seed(i))
            torch.testing.assert_close(forward(layer, x), forward(ref, x), rtol=1e-5, atol=1e-6)
            checked += 1
        return checked


@pytest.mark.parametrize(
    ("saved", "loaded"),
    [((8, 2, 2), (8, 1, 4)), ((2, 2, 1), (1, 1, 1)), ((1, 1, 1), (4, 4, 1))],
    ids=["tp2pp2dp2-to-tp1pp4dp2", "tp2-to-tp1", "tp1-to-tp4"],
)
def test_mlp_stack_loads_at_another_layout(run_ranks, tmp_path, saved, loaded):
    path = str(tmp_path / "ckpt")
    world, tp, pp = saved
    run_ranks(world, save_at, path, tp, pp)
    world, tp, pp = loaded
    checked = run_ranks(world, load_at, path, tp, pp)
    assert all(c == LAYERS // pp for c in checked)

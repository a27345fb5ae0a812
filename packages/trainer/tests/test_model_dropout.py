"""Dropout under tensor, sequence and pipeline parallelism draws the masks it should: replicated
activations (no sequence parallelism) the same mask on every TP rank, a sequence shard a mask of its
own per TP rank, each CP rank (another part of the sequences) and each pipeline stage its own masks (the
default generator would repeat the first stage's masks on every stage, and the same mask on every TP
rank's shard and every CP rank's part). Training with dropout is
tested in ``test_train_parity.py`` (TP2 equals one process; full recompute draws the same masks)."""

import torch
import torch.distributed as dist

import pstate
from trainer.model import ModelGroups
from trainer.model.dropout import Dropout, DropoutRNG


def masks(sharded: bool, stage: int, axis: str = "tp") -> list[torch.Tensor]:
    """Every rank's dropout mask (all the ranks of the ``axis``: TP, or CP)."""
    config = pstate.ParallelConfig(**{axis: dist.get_world_size()})
    with pstate.initialize(config) as ps:
        groups = ModelGroups.from_state(ps, sequence_parallel=ps.tp.size > 1)
        mask = Dropout(0.5, DropoutRNG(seed=5, groups=groups, stage=stage), sharded=sharded)(torch.ones(256)) != 0
        everyone = [torch.empty_like(mask) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, mask)
        return [m.clone() for m in everyone]


def test_shards_get_their_own_masks_and_replicas_the_same(run_ranks):
    replicated = run_ranks(2, masks, False, 0)[0]
    sharded = run_ranks(2, masks, True, 0)[0]
    other_stage = run_ranks(2, masks, False, 1)[0]
    assert torch.equal(replicated[0], replicated[1])
    assert not torch.equal(sharded[0], sharded[1])
    assert not torch.equal(replicated[0], other_stage[0])
    assert 0.3 < replicated[0].float().mean() < 0.7  # p=0.5 really drops


def test_context_parallel_ranks_get_their_own_masks(run_ranks):
    for sharded in (False, True):  # the CP ranks hold other tokens, whether or not TP shards them too
        first, second = run_ranks(2, masks, sharded, 0, "cp")[0]
        assert not torch.equal(first, second)

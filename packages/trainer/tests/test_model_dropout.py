"""Dropout under tensor, sequence and pipeline parallelism draws the masks it should: replicated
activations (no sequence parallelism) the same mask on every TP rank, a sequence shard a mask of its
own per TP rank, and each pipeline stage its own masks (the default generator would repeat the first
stage's masks on every stage, and the same mask on every TP rank's shard). Training with dropout is
tested in ``test_train_parity.py`` (TP2 equals one process; full recompute draws the same masks)."""

import torch
import torch.distributed as dist

import pstate
from trainer.model import ModelGroups
from trainer.model.dropout import Dropout, DropoutRNG


def masks(sharded: bool, stage: int) -> list[torch.Tensor]:
    """This rank's dropout mask, and every TP rank's (gathered)."""
    with pstate.initialize(pstate.ParallelConfig(tp=dist.get_world_size())) as ps:
        rng = DropoutRNG(seed=5, groups=ModelGroups.from_state(ps, sequence_parallel=True), stage=stage)
        mask = Dropout(0.5, rng, sharded=sharded)(torch.ones(256)) != 0
        everyone = [torch.empty_like(mask) for _ in range(ps.tp.size)]
        dist.all_gather(everyone, mask, group=ps.tp.group)
        return [m.clone() for m in everyone]


def test_shards_get_their_own_masks_and_replicas_the_same(run_ranks):
    replicated = run_ranks(2, masks, False, 0)[0]
    sharded = run_ranks(2, masks, True, 0)[0]
    other_stage = run_ranks(2, masks, False, 1)[0]
    assert torch.equal(replicated[0], replicated[1])
    assert not torch.equal(sharded[0], sharded[1])
    assert not torch.equal(replicated[0], other_stage[0])
    assert 0.3 < replicated[0].float().mean() < 0.7  # p=0.5 really drops

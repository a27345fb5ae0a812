"""Parameter tags and the collective names that sibling packages share through pstate."""

import pytest
import torch
import torch.distributed as dist

from pstate import tags
from pstate.collectives import all_gather_single, reduce_scatter_single
from pstate.testing import error_messages


def test_tags_default_to_untagged_and_read_back_what_was_set():
    param = torch.nn.Parameter(torch.zeros(2))
    assert tags.tensor_parallel_dim(param) is None
    assert not tags.is_sequence_parallel(param) and not tags.is_expert_parallel(param)
    assert not tags.is_tied_copy(param)
    assert tags.mark_tensor_parallel(param, 1) is param and tags.tensor_parallel_dim(param) == 1
    tags.mark_sequence_parallel(param)
    tags.mark_expert_parallel(param)
    assert tags.is_sequence_parallel(param) and tags.is_expert_parallel(param)
    assert tags.mark_tied_copy(param) is param and tags.is_tied_copy(param)
    piece = torch.zeros(1)
    assert tags.copy_tags(param, piece) is piece
    assert tags.tensor_parallel_dim(piece) == 1 and tags.is_sequence_parallel(piece)
    assert tags.is_expert_parallel(piece) and tags.is_tied_copy(piece)
    assert not tags.is_tied_copy(tags.copy_tags(torch.zeros(1), torch.zeros(1)))  # untagged stays untagged


def gather_and_scatter():
    rank, world = dist.get_rank(), dist.get_world_size()
    gathered = torch.empty(world)
    all_gather_single(gathered, torch.tensor([float(rank)]))
    scattered = torch.empty(1)
    reduce_scatter_single(scattered, torch.arange(float(world)))
    return gathered.tolist(), scattered.item()


@pytest.mark.parametrize("world", [1, 3])
def test_single_tensor_collectives(run_ranks, world):
    for rank, (gathered, scattered) in enumerate(run_ranks(world, gather_and_scatter)):
        assert gathered == [float(r) for r in range(world)]
        assert scattered == world * rank


def test_error_messages_collects_the_expected_error_or_none():
    def fail():
        raise ValueError("bad")

    assert error_messages([fail, lambda: None], ValueError) == ["bad", None]
    with pytest.raises(KeyError):
        error_messages([lambda: {}["x"]], ValueError)  # other errors are not swallowed

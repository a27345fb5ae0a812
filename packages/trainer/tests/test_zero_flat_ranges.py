"""A ZeRO flat range of the experts' fused ``[gate; up]`` weight, split into the ``gate`` and ``up`` tensors'
flat ranges (``flat_range_shards`` with column-block pieces): every range of a ``[experts, 2f, h]``
weight against picking the elements one by one, and a copy written back where the elements are not
contiguous (what a ZeRO run's checkpoint load relies on). Exact: only indexing."""

import pytest
import torch

from pstate import Shard
from trainer.model.shards import Piece, flat_range_shards

EXPERTS, F, H = 3, 2, 2  # per expert: gate (F rows), then up (F rows), of H columns
SHAPE = (EXPERTS, 2 * F, H)


def pieces(param):
    shape = (EXPERTS, F, H)
    return [Piece(name, param, shape, (0, 0, 0), dim1=(i * F, (i + 1) * F)) for i, name in enumerate(("gate", "up"))]


@pytest.mark.parametrize("low", range(0, EXPERTS * 2 * F * H + 1, 3))
def test_every_flat_range_splits_into_the_blocks_flat_ranges(low):
    param = torch.nn.Parameter(torch.arange(float(EXPERTS * 2 * F * H)).reshape(SHAPE))
    numel = param.numel()
    for high in range(low, numel + 1):
        local = Shard(param.detach().reshape(-1)[low:high].clone(), SHAPE, (0, 0, 0), SHAPE, (low, high))
        gathered = []
        split = flat_range_shards(pieces(param), local, gathered)
        for piece in pieces(param):
            block = piece.of(param.detach()).reshape(-1)
            wanted = [i for i, v in enumerate(block.tolist()) if low <= v < high]
            start, stop = split[piece.name].flat_range
            assert list(range(start, stop)) == wanted  # a contiguous range of the block
            assert torch.equal(split[piece.name].data, block[start:stop])
            assert split[piece.name].shape == (EXPERTS, F, H)
        for shard in split.values():
            shard.data.neg_()  # as if loaded: the copies are written back, the views already are
        for copy in gathered:
            copy.scatter()
        assert torch.equal(local.data, -param.detach().reshape(-1)[low:high])


def test_column_blocks_without_gathered_are_refused():
    param = torch.nn.Parameter(torch.zeros(SHAPE))
    local = Shard(param.detach().reshape(-1), SHAPE, (0, 0, 0), SHAPE, (0, param.numel()))
    with pytest.raises(ValueError, match="gathered="):
        flat_range_shards(pieces(param), local)


def test_a_range_over_several_experts_is_a_copy_within_one_a_view():
    param = torch.nn.Parameter(torch.zeros(SHAPE))
    for (low, high), copies in zip([(0, param.numel()), (1, 2 * F * H - 1)], [2, 0]):
        data = param.detach().reshape(-1)[low:high]
        gathered = []
        flat_range_shards(pieces(param), Shard(data, SHAPE, (0, 0, 0), SHAPE, (low, high)), gathered)
        assert len(gathered) == copies

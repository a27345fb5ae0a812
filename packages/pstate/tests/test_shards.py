import pytest
import torch

from pstate import Shard, tensor_parallel_shard


def test_rectangle_defaults_shape_to_data():
    s = Shard(torch.zeros(2, 3), (4, 3), (2, 0))
    assert s.shape == (2, 3) and s.flat_range is None


def test_flat_range_holds_its_elements():
    s = Shard(torch.arange(5.0), (4, 3), (0, 0), shape=(4, 3), flat_range=(4, 9))
    assert s.flat_range == (4, 9)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(data=torch.zeros(2, 3), global_shape=(4, 3), offsets=(3, 0)), "dimension 0"),
        (dict(data=torch.zeros(2, 3), global_shape=(4, 3), offsets=(0,)), "differ in rank"),
        (dict(data=torch.zeros(2, 2), global_shape=(4, 3), offsets=(0, 0), shape=(2, 3)), "not the shape"),
        (dict(data=torch.zeros(5), global_shape=(4, 3), offsets=(0, 0), shape=(4, 3), flat_range=(10, 15)), "outside"),
        (dict(data=torch.zeros(4), global_shape=(4, 3), offsets=(0, 0), shape=(4, 3), flat_range=(0, 5)), "5 elements"),
    ],
)
def test_bad_descriptions_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Shard(**kwargs)


def test_within_moves_a_piece_into_the_enclosing_tensor():
    local = Shard(torch.arange(3.0), (2, 4), (0, 0), shape=(2, 4), flat_range=(2, 5))
    full = local.within((6, 4), (2, 0))
    assert (full.global_shape, full.offsets, full.shape, full.flat_range) == ((6, 4), (2, 0), (2, 4), (2, 5))


def test_tensor_parallel_shard_places_the_slice():
    w = torch.zeros(3, 5)
    s = tensor_parallel_shard(w, 1, rank=2, size=4)
    assert (s.global_shape, s.offsets) == ((3, 20), (0, 10))
    r = tensor_parallel_shard(w, None, rank=2, size=4)
    assert (r.global_shape, r.offsets) == ((3, 5), (0, 0))

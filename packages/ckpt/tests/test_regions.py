"""A flat range of a rectangle is exactly a few boxes: every range of small shapes, checked exhaustively."""

import itertools
import math

import pytest
import torch

from ckpt.regions import Box, box_view, boxes, intersect


@pytest.mark.parametrize("shape", [(), (5,), (3, 4), (2, 3, 4), (2, 1, 3, 2)])
def test_flat_ranges_become_at_most_2n_minus_1_contiguous_boxes(shape):
    n = math.prod(shape)
    values = torch.arange(n).reshape(shape)
    offsets = tuple(range(1, len(shape) + 1))  # the rectangle sits inside a bigger global tensor
    for start, stop in itertools.combinations_with_replacement(range(n + 1), 2):
        found = boxes(offsets, shape, (start, stop))
        assert len(found) <= max(1, 2 * len(shape) - 1)
        covered = []
        for box in found:
            local = tuple(slice(b - o, b - o + s) for b, o, s in zip(box.offsets, offsets, box.shape))
            part = values[local].flatten()
            # the box is the run of the flat data that starts at box.flat
            assert torch.equal(part, torch.arange(start + box.flat, start + box.flat + box.numel))
            covered += part.tolist()
        assert covered == list(range(start, stop))


def test_intersections_and_views():
    a, b = Box((0, 0), (4, 4)), Box((2, 3), (5, 5))
    assert intersect(a, b) == ((2, 3), (2, 1))
    assert intersect(a, Box((4, 0), (1, 4))) is None
    assert intersect(Box((), ()), Box((), ())) == ((), ())
    data = torch.zeros(10)
    (box,) = boxes((0, 0), (3, 4), (4, 8))  # the second row, data[0:4]
    box_view(data, Box((1, 0), (1, 4), flat=2)).fill_(1)
    assert data.tolist() == [0, 0, 1, 1, 1, 1, 0, 0, 0, 0] and box.shape == (1, 4)

"""Bad input to ``DataParallel``: a clear ``DataParallelError`` on every rank."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dp_shard import DataParallel, DataParallelError


def wrap_error(kind):
    rank = dist.get_rank()
    if kind == "frozen":
        module = nn.Linear(4, 4).requires_grad_(False)
    elif kind == "shape":
        module = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 5 if rank == 1 else 4))
    elif kind == "count":
        module = nn.Sequential(*[nn.Linear(4, 4) for _ in range(2 if rank == 0 else 3)])
    else:
        module = nn.Linear(4, 4, dtype=torch.float64 if rank == 0 else torch.float32)
    try:
        DataParallel(module, group=dist.group.WORLD)
    except DataParallelError as error:
        return str(error)
    return None


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("frozen", ["Linear has no trainable parameters"]),
        ("shape", ["rank 1 has '1.weight' of shape [5, 4]", "rank 0 has '1.weight' of shape [4, 4]"]),
        ("count", ["rank 1 has 6 trainable parameters, rank 0 has 4"]),
        ("dtype", ["dtype float32", "dtype float64"]),
    ],
)
def test_bad_module_is_a_clear_error_on_every_rank(run_ranks, kind, words):
    for message in run_ranks(2, wrap_error, kind):
        assert message is not None
        for word in words:
            assert word in message


def test_bad_arguments():
    with pytest.raises(DataParallelError, match=r"must be a torch\.nn\.Module"):
        DataParallel(lambda x: x, group=None)
    with pytest.raises(DataParallelError, match="bucket_size_mb=0"):
        DataParallel(nn.Linear(2, 2), group=None, bucket_size_mb=0)
    with pytest.raises(DataParallelError, match="floating-point"):
        DataParallel(nn.Linear(2, 2), group=None, grad_dtype=torch.int32)
    with pytest.raises(TypeError, match=r"pstate Axis or a torch\.distributed ProcessGroup"):
        DataParallel(nn.Linear(2, 2), group=None)

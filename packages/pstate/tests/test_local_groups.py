"""``initialize(local_groups=True)``: a rank that creates only its own groups sees exactly the axes (ranks,
rank within each) that creating every group of the layout gives it, on a matrix of layouts, under
PyTorch's ``fake`` backend (one process plays any rank; its groups never communicate)."""

import pytest
import torch.distributed as dist

import pstate
from pstate.layout import AXIS_GROUPS

LAYOUTS = [
    (pstate.ParallelConfig(tp=2, pp=2), 8),
    (pstate.ParallelConfig(tp=2, cp=2, pp=2, ep=2), 64),
    (pstate.ParallelConfig(tp=4, pp=2, ep=4, etp=1), 64),
    (pstate.ParallelConfig(tp=2, cp=2, order="tp-cp-ep-pp-dp"), 32),
    (pstate.ParallelConfig(tp=2, cp=4, cp_a2a=2, pp=2), 64),
]


def axes_of(config: pstate.ParallelConfig, world: int, rank: int, local: bool) -> dict:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        ps = pstate.initialize(config, local_groups=local)
        names = [*AXIS_GROUPS, "embedding", "world"]  # cp_a2a, cp_ring: None without the split
        out = {n: (a.ranks, a.rank, dist.get_world_size(a.group)) for n in names if (a := getattr(ps, n)) is not None}
        created = len(ps._created)
        ps.destroy()
        return {"axes": out, "created": created}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("config", "world"), LAYOUTS)
def test_local_groups_equal_every_group(config, world):
    for rank in (0, world // 2 + 1, world - 1):
        local, full = axes_of(config, world, rank, True), axes_of(config, world, rank, False)
        assert local["axes"] == full["axes"]
        assert local["created"] == full["created"]  # the same groups hold this rank either way


def test_fake_backend_defaults_to_local_groups():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=5, world_size=4096)
    try:
        ps = pstate.initialize(pstate.ParallelConfig(tp=8, pp=4))
        # the world's groups number thousands; this rank holds a dozen distinct ones
        assert len(ps._created) <= len(AXIS_GROUPS) + 1
        assert ps.tp.ranks == tuple(range(8)) and ps.pp.ranks == (5, 1029, 2053, 3077)
        ps.destroy()
    finally:
        dist.destroy_process_group()

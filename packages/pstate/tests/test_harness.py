"""The multi-rank harness: results per rank, failures tagged with the rank, hangs turned into failures."""

import os
import time
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from pstate.testing import Harness, RankError, RankTimeout


@dataclass
class Payload:
    """A class of this test module: arguments and results of module-defined types must travel."""

    scale: float


def rank_and_sum(payload, *, offset):
    value = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(value)
    return Payload(payload.scale * value.item() + offset), dist.get_rank(), dist.get_world_size(), dist.get_backend()


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_each_rank_returns_its_result(run_ranks, world):
    results = run_ranks(world, rank_and_sum, Payload(2.0), offset=1)
    total = world * (world - 1) / 2
    assert results == [(Payload(2.0 * total + 1), r, world, "gloo") for r in range(world)]


def raise_on_rank_two():
    if dist.get_rank() == 2:
        raise KeyError("missing on rank two")
    dist.barrier()  # the other ranks are left waiting: the harness must not wait for them forever


def test_an_exception_names_the_rank_and_keeps_the_original(run_ranks):
    with pytest.raises(RankError, match="rank 2 of 4 failed in raise_on_rank_two") as info:
        run_ranks(4, raise_on_rank_two)
    assert info.value.rank == 2
    assert isinstance(info.value.__cause__, KeyError)
    assert "missing on rank two" in info.value.remote_traceback
    assert "did not finish" in str(info.value)  # the ranks stuck in the barrier are reported
    assert run_ranks(4, rank_and_sum, Payload(1.0), offset=0)[0][0] == Payload(6.0)  # a fresh pool serves on


def exit_on_rank_one():
    if dist.get_rank() == 1:
        os._exit(7)
    return "alive"


def test_a_dying_rank_is_reported_with_its_exit_code(run_ranks):
    with pytest.raises(RankError, match=r"rank 1 exited \(exit code 7\)"):
        run_ranks(2, exit_on_rank_one)


def hang_on_rank_zero():
    if dist.get_rank() == 0:
        time.sleep(3600)
    dist.barrier()


def test_a_hang_becomes_a_failure_with_every_stuck_stack(run_ranks):
    assert run_ranks(2, exit_never) == ["fine", "fine"]  # this module is loaded in the ranks: the call starts at once
    with pytest.raises(RankTimeout) as info:
        run_ranks(2, hang_on_rank_zero, timeout_s=5)
    text = str(info.value)
    assert "did not finish within 5 s on ranks 0, 1 of 2" in text
    assert "--- rank 0 ---" in text and "in hang_on_rank_zero" in text
    assert "--- rank 1 ---" in text and "in barrier" in text
    assert run_ranks(2, exit_never) == ["fine", "fine"]


def exit_never():
    return "fine"


def test_only_module_level_functions_are_accepted(run_ranks):
    def nested():
        return 1

    for fn in (nested, lambda: 1):
        with pytest.raises(TypeError, match="must be a function defined at module level"):
            run_ranks(2, fn)
    with pytest.raises(ValueError, match="world_size=0"):
        run_ranks(0, exit_never)


def pid():
    return os.getpid()


def test_warm_pools_are_reused_and_capped():
    with Harness(max_warm_ranks=8) as harness:
        first = harness.run(4, pid)
        assert harness.run(4, pid) == first  # the same processes serve the next call
        harness.run(2, pid)
        assert harness.run(4, pid) == first
        harness.run(3, pid)  # 4 + 2 + 3 > 8: the least recently used pool (2 ranks) is closed
        assert sorted(k[0] for k in harness._pools) == [3, 4]
        assert harness.run(4, pid) == first

"""pytest plugin (registered through the ``pytest11`` entry point): the ``run_ranks`` fixture.

    def check_sum():
        import torch, torch.distributed as dist
        t = torch.tensor([dist.get_rank()])
        dist.all_reduce(t)
        return t.item()

    def test_sum(run_ranks):
        assert run_ranks(4, check_sum) == [6, 6, 6, 6]

Option ``--rank-timeout SECONDS`` sets the per-call timeout (default 300: an outer bound for a hang on a
loaded machine, not a speed limit).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .harness import Harness


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--rank-timeout", type=float, default=300.0, help="seconds before a multi-rank call is a hang (pstate)"
    )


@pytest.fixture(scope="session")
def rank_harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    """The session's :class:`~pstate.testing.Harness`; its warm rank pools are shared by all tests."""
    with Harness(timeout_s=request.config.getoption("--rank-timeout")) as harness:
        yield harness


@pytest.fixture
def run_ranks(rank_harness: Harness) -> Callable[..., list[Any]]:
    """``run_ranks(world_size, fn, *args, device="cpu", timeout_s=None, **kwargs)`` -> per-rank results."""
    return rank_harness.run

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

Markers: ``@pytest.mark.cuda`` (or ``cuda(gpus=N)``) runs a test only where that many CUDA GPUs are
visible, ``@pytest.mark.te`` only where Transformer Engine is installed as well; elsewhere they are
skipped with the reason, so one suite serves CPU CI and GPU machines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib.util import find_spec
from typing import Any

import pytest

from .harness import Harness


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda(gpus=1): needs that many CUDA GPUs; skipped elsewhere")
    config.addinivalue_line("markers", "te: needs Transformer Engine and a CUDA GPU; skipped elsewhere")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    marked = [i for i in items if i.get_closest_marker("cuda") or i.get_closest_marker("te")]
    if not marked:
        return
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in marked:
        cuda, te = item.get_closest_marker("cuda"), item.get_closest_marker("te")
        needed = max(cuda.kwargs.get("gpus", 1) if cuda else 0, 1 if te else 0)
        if needed > visible:
            item.add_marker(pytest.mark.skip(reason=f"needs {needed} CUDA GPU(s), {visible} visible"))
        elif te and find_spec("transformer_engine") is None:
            item.add_marker(pytest.mark.skip(reason="needs Transformer Engine (transformer_engine)"))


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

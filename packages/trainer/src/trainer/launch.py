"""Starting the ranks of a run: under ``torchrun`` (the environment says the world), in this process
(one rank), or ``--nproc N`` local ranks started through PyTorch's elastic launcher.

Multi-node: run ``torchrun --nnodes ... --nproc-per-node ... -m trainer train ...`` on every node (under
SLURM, one ``srun`` task per node running that torchrun command, with ``--rdzv-endpoint`` the first
node); ``train`` reads ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` as torchrun sets them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from pstate.device import backend_for, default_device

from .config import RunConfig, parse_run_config, to_toml


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def global_rank() -> int:
    """This process's rank in the run (0 for the local launcher, which starts the ranks itself)."""
    return int(os.environ.get("RANK", "0")) if under_torchrun() else 0


def world_size(nproc: int | None) -> int:
    """The number of ranks the run will have."""
    if under_torchrun():
        return int(os.environ["WORLD_SIZE"])
    return nproc or 1


def run_ranks(cfg: RunConfig, nproc: int | None) -> list[dict[str, Any]]:
    """Train ``cfg`` on the ranks the situation gives; returns rank 0's records (or this rank's)."""
    if under_torchrun() or not nproc or nproc == 1:
        return _train_here(to_toml(cfg), local_world=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"trainer-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
    )
    results = elastic_launch(config, _worker)(to_toml(cfg), nproc)
    return results[0]


def _worker(cfg_toml: str, local_world: int) -> list[dict[str, Any]]:
    return _train_here(cfg_toml, local_world)


def _train_here(cfg_toml: str, local_world: int) -> list[dict[str, Any]]:
    """Join (or create) the default group and train; the config travels as TOML text."""
    from .train.loop import train

    cfg = parse_run_config(cfg_toml)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    device = default_device()
    if device.type != "cpu":
        torch.cuda.set_device(device)
    with default_group(device):
        return train(cfg)


@contextmanager
def default_group(device: torch.device) -> Iterator[None]:
    """The default process group: torchrun's (from the environment), or a one-rank group of this process;
    destroyed on exit if made here."""
    created = not dist.is_initialized()
    if created:
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend_for(device))
        else:  # one rank, no launcher
            dist.init_process_group(backend_for(device), store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        if created:
            dist.barrier()
            dist.destroy_process_group()

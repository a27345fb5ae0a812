"""The trainer's checkpoints are planned locally from the layout (``trainer.train.replicas``): at each
layout every rank takes the local plan (the exchange planner is never called), and the checkpoint is
the same, file for file and index entry for index entry, as the one planned by exchanging every rank's
descriptions. Exact comparison: both write the same bytes."""

import importlib
import json
from pathlib import Path
from unittest import mock

import pytest
import torch.distributed as dist

import ckpt
import trainer.train.loop as loop
from trainer.config import load_run_config
from trainer.train.loop import train

SAVE = importlib.import_module("ckpt.save")

LAYOUTS = {
    "tp2-sp-pp2-dp2": (8, {"parallel": {"tp": 2, "pp": 2}, "train": {"sequence_parallel": True}}),
    "zero1-moe-ep2-tp2-sp-dp2": (
        4,
        {
            "model": {"preset": "tiny-moe"},
            "parallel": {"tp": 2, "ep": 2},
            "train": {"zero": 1, "sequence_parallel": True},
        },
    ),
    "zero3-tp2-pp2-dp2": (8, {"parallel": {"tp": 2, "pp": 2}, "train": {"zero": 3}}),
    "tied-zero2-pp2-dp2": (4, {"model": {"preset": "tiny-gpt2"}, "parallel": {"pp": 2}, "train": {"zero": 2}}),
    # HSDP 2x2 (flat ranges replicated across the shard groups) with experts sharded over edp
    "hsdp-2x2-moe-ep2-tp2-sp": (
        8,
        {
            "model": {"preset": "tiny-moe"},
            "parallel": {"tp": 2, "ep": 2, "dp_shard": 2},
            "train": {"zero": 3, "sequence_parallel": True},
        },
    ),
}


def save_both_ways(overrides: dict, root: str) -> int:
    """Train one step and save it twice: with the layout's replicas, and by the exchange."""
    exchanges = []
    real_plan, real_save = SAVE.plan, ckpt.save

    def counting_plan(*args):
        exchanges.append(1)
        return real_plan(*args)

    def both(state, path, **kwargs):
        with mock.patch.object(SAVE, "plan", counting_plan):
            real_save(state, path, **kwargs)
        assert not exchanges, "the local plan fell back to the exchange"
        kwargs.pop("replicas")
        with mock.patch.object(SAVE, "plan", counting_plan):
            real_save(state, Path(root) / "exchange", **kwargs)  # without replicas: by the exchange
        assert exchanges

    base = {
        "model": {"preset": "tiny"},
        "train": {
            "steps": 2,
            "seq_len": 16,
            "micro_batch": 2,
            "global_batch": 8,
            "seed": 3,
            "exit_interval": 1,
            "async_save": False,
        },
        "data": {"cache_dir": str(Path(root) / "cache")},
    }
    for section, values in overrides.items():
        base.setdefault(section, {}).update(values)
    base["train"].update(save=str(Path(root) / "local"), exit_interval=1, async_save=False)
    with mock.patch.object(loop.ckpt, "save", both):
        train(load_run_config(overrides=base))
    dist.barrier()
    return dist.get_rank()


@pytest.mark.parametrize("name", LAYOUTS)
def test_local_plans_write_the_checkpoint_the_exchange_writes(run_ranks, tmp_path, name):
    world, overrides = LAYOUTS[name]
    run_ranks(world, save_both_ways, overrides, str(tmp_path))
    local, exchange = ckpt.step_dir(tmp_path / "local", 1), tmp_path / "exchange"
    a, b = (json.loads((p / "index.json").read_text()) for p in (local, exchange))
    for index in (a, b):
        del index["created"]
    assert a == b
    names = sorted(p.name for p in local.iterdir())
    assert names[0] == "index.json"
    assert names == sorted(p.name for p in exchange.iterdir()) and len(names) > 2
    for n in names[1:]:  # the data files (the index differs by its creation time only: compared above)
        assert (local / n).read_bytes() == (exchange / n).read_bytes(), n

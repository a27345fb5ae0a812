"""``trainer train --dry-run``: rank R of a 16,384-rank 4D+EP job (TP2 x CP2 x PP2 x EP2, tiny MoE model)
built in this process with the fake backend gives the same per-rank figures (parameter, gradient,
optimizer and buffer bytes; checkpoint leaves) as rank R' of a real world-8 gloo run with the same
TP/CP/PP/EP coordinates; at world 8 the dry run equals the real run exactly, checkpoint share included."""

import pytest
import torch
import torch.distributed as dist

import pstate
from trainer.config import check_run, load_run_config
from trainer.train.dry_run import dry_run, rank_figures
from trainer.train.setup import setup

OVERRIDES = {
    "model": {"preset": "tiny-moe", "vocab_size": 256},
    "parallel": {"tp": 2, "cp": 2, "pp": 2, "ep": 2},
    "train": {"sequence_parallel": True, "seq_len": 32, "micro_batch": 1, "zero": 1},
}
AXES = ("tp", "cp", "pp", "ep", "etp")


def real_figures() -> dict:
    cfg = load_run_config(overrides=OVERRIDES)
    plan = check_run(cfg, dist.get_world_size())
    torch.manual_seed(cfg.train.seed)
    with pstate.initialize(cfg.parallel) as ps:
        run = setup(cfg, ps, cfg.model, plan)
        return {"coords": ps.layout.coords(ps.rank), **rank_figures(run, ps.rank)}


@pytest.fixture(scope="module")
def real(rank_harness):
    return rank_harness.run(8, real_figures)


def test_dry_runs_at_world_8_equal_the_real_run(real):
    cfg = load_run_config(overrides=OVERRIDES)
    for rank in (0, 3, 7):
        dry = dry_run(cfg, 8, rank)
        assert {k: dry[k] for k in real[rank]} == real[rank]


def test_dry_runs_at_world_16384_equal_the_real_run_where_the_layouts_coincide(real):
    cfg = load_run_config(overrides=OVERRIDES)
    for rank in (0, 8191, 16383):
        dry = dry_run(cfg, 16384, rank)
        (twin,) = [r for r in real if all(r["coords"][a] == dry["coords"][a] for a in AXES)]
        # ZeRO-1 shards the optimizer over DP (1 at world 8, 1024 here): compare what does not shard
        assert dry["bytes"]["parameters"] == twin["bytes"]["parameters"]
        assert dry["bytes"]["buffers"] == twin["bytes"]["buffers"]
        assert dry["checkpoint"]["leaves"] == twin["checkpoint"]["leaves"]
        assert set(dry["seconds"]) == {"config", "process_group", "groups", "model_and_engine", "checkpoint_plan"}

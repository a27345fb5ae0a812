"""``trainer plan --check``: the planner's layout dry-run at ranks 0, the middle one and the last, each
rank's figures those of ``trainer train --dry-run``; a layout the trainer refuses is one line, exit 2."""

import json

from trainer.cli import main
from trainer.config import load_run_config
from trainer.train.dry_run import dry_run

ARGS = ["plan", "--model", "tiny", "--vocab-size", "256", "--gpus", "8", "--seq-len", "32", "--global-batch", "8"]


def test_check_dry_runs_the_evaluated_layout(capsys):
    assert main([*ARGS, "--tp", "2", "--pp", "2", "--check", "--json"]) == 0
    (check,) = json.loads(capsys.readouterr().out)
    assert check["layout"].startswith("world=8 tp=2 pp=2")
    assert [r["rank"] for r in check["ranks"]] == [0, 4, 7]
    cfg = load_run_config(
        overrides={
            "model": {"preset": "tiny", "vocab_size": 256},
            "parallel": {"tp": 2, "pp": 2},
            "train": {"seq_len": 32, "global_batch": 8, "micro_batch": 4, "precision": "bf16"},
        }
    )
    direct = dry_run(cfg, 8, 7, step=False)
    assert check["ranks"][2]["bytes"] == direct["bytes"] and check["ranks"][2]["coords"] == direct["coords"]
    assert check["planned"]["parameters"] > 0


def test_check_prints_a_line_per_rank(capsys):
    assert main([*ARGS, "--tp", "2", "--pp", "2", "--check"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("check world=8 tp=2 pp=2") and len(lines) == 4
    assert lines[3].startswith("  rank 7 (tp1 cp0 dp1 pp1")


def test_a_refused_layout_is_one_line_and_exit_2(capsys):
    args = ["plan", "--model", "tiny-moe", "--vocab-size", "256", "--gpus", "8", "--seq-len", "32"]
    assert main([*args, "--global-batch", "8", "--tp", "2", "--ep", "2", "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs --sequence-parallel" in err[0]

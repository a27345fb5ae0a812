"""``trainer train`` and ``trainer layout`` as a user runs them, in subprocesses.

The README's main command (8 local ranks, TP2 x PP2 x DP2 with sequence parallelism, on the embedded
corpus) must bring the loss down; the metrics file holds one JSON line per step with the named fields.
"""

import json
import os
import subprocess
import sys

import pytest


def trainer(*args: str, cwd, timeout: float = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRAINER_CACHE": str(cwd / "cache")}
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_readme_command_trains_on_eight_ranks_and_the_loss_goes_down(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    done = trainer(
        "train", "--nproc", "8", "--tp", "2", "--pp", "2", "--sequence-parallel", "--steps", "12", "--seq-len", "64",
        "--global-batch", "16", "--micro-batch", "2", "--lr", "3e-3", "--metrics-file", str(metrics), cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "data_time_s", "tokens"} <= set(
        records[0]
    )
    assert {"memory_mb", "memory_reserved_mb"} <= set(records[0]) and records[-1]["tokens"] == 12 * 16 * 64
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    # rank 0 alone says what runs (banner) and how it ended (one summary), not each of the 8 ranks
    err = done.stderr
    assert err.count("model: ") == 1 and err.count("trained steps 1..12: loss") == 1, err
    assert "layout: 8 ranks = tp 2 x pp 2 x dp 2 x cp 1; sequence parallel, DDP, 1f1b over 4 micro-batches" in err
    assert "data: embedded corpus" in err and f"cached in {tmp_path / 'cache'}" in err
    assert "batch: 16 samples x 64 tokens = 1,024 tokens per step; 12 steps (12,288 tokens)" in err
    assert "checkpoints: none saved" in err and f"metrics: JSON lines in {metrics}" in err
    assert err.index("model: ") < err.index("step      1/12") < err.index("trained steps")


def test_print_config_shows_the_resolved_run(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('[model]\npreset = "tiny-gpt2"\n[train]\nsteps = 3\n')
    done = trainer(
        "train", "--config", str(config), "--tp", "2", "--set", "optim.lr=0.01", "--print-config", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert 'norm = "layernorm"' in done.stdout and "tp = 2" in done.stdout and "lr = 0.01" in done.stdout
    assert "steps = 3" in done.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sequence-parallel"], "--sequence-parallel needs --tp > 1"),
        (["--nproc", "4", "--pp", "3"], "world_size=4"),
        (["--model", "tiny-moe", "--nproc", "3", "--ep", "3"], "ep=3 must divide the 4 experts"),
        (["--global-batch", "7"], "global_batch=7 must be divisible"),
        (["--set", "train.stepz=3"], "unknown field"),
        (["--nproc", "4", "--cp", "4", "--set", "parallel.cp_a2a=3"], "cp_a2a=3 must divide cp=4"),
        (
            ["--nproc", "4", "--cp", "4", "--set", "train.cp_attention=hierarchical"],
            "train.cp_attention='hierarchical' with cp=4 needs parallel.cp_a2a > 1",
        ),
    ],
)
def test_bad_configurations_are_refused_before_any_process_starts(capsys, args, message):
    from trainer.cli import main

    assert main(["train", *args]) == 2  # the command's own code path, without a new interpreter per case
    err = capsys.readouterr().err
    assert err.startswith("trainer train: error: ") and message in err and err.count("\n") == 1


def test_a_bad_configuration_exits_2_from_the_command_line(tmp_path):
    done = trainer("train", "--nproc", "4", "--pp", "3", cwd=tmp_path)
    assert done.returncode == 2 and "world_size=4" in done.stderr and "starting" not in done.stderr


def test_preprocess_then_train_on_the_dataset(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    assert (
        trainer(
            "preprocess", "--input", str(text), "--output", str(tmp_path / "notes"), "--quiet", cwd=tmp_path
        ).returncode
        == 0
    )
    done = trainer(
        "train",
        "--data",
        str(tmp_path / "notes"),
        "--steps",
        "3",
        "--seq-len",
        "32",
        "--set",
        "data.valid_fraction=0.0",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "trained steps 1..3" in done.stderr


def test_layout_prints_the_rank_grid(tmp_path):
    done = trainer("layout", "--world-size", "8", "--tp", "2", "--pp", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "decoder grid: tp=2  cp=1  dp=2  pp=2" in done.stdout


def test_sigterm_saves_then_exits_and_a_rerun_resumes(tmp_path):
    """SIGTERM to the launcher: the ranks finish their step, save, and exit; the rerun continues."""
    import signal
    import time

    metrics, save = tmp_path / "metrics.jsonl", tmp_path / "ckpt"
    args = ["train", "--nproc", "2", "--steps", "10000", "--seq-len", "32", "--save", str(save)]
    env = {**os.environ, "TRAINER_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer", *args, "--metrics-file", str(metrics)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 600  # an outer bound on the wait for the event: three steps logged
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and proc.poll() is None:
        assert time.monotonic() < deadline, "no three steps within 600 s"
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert 3 <= steps[-1] < 10000, err
    assert (save / f"step_{steps[-1]:08d}" / "index.json").exists(), err
    done = trainer(
        "train", "--nproc", "2", "--steps", str(steps[-1] + 2), "--seq-len", "32", "--save", str(save), cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert f"resumed from {save / f'step_{steps[-1]:08d}'} at step {steps[-1]}" in done.stderr
    assert done.stderr.count(f"saved checkpoint step {steps[-1] + 2} to {save / f'step_{steps[-1] + 2:08d}'}") == 1

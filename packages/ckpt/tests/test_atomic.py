"""Atomic saves: a save killed half-way leaves ``latest`` at the previous checkpoint, which loads;
``keep=`` retention never removes the newest nor a checkpoint being read."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import ckpt

# A child process saves step 1 fully, then starts step 2 and stops inside the ``after_write`` hook,
# after its data file is durable and before the index is committed; the test then kills it.
CHILD = textwrap.dedent(
    """
    import sys, time, torch, ckpt
    root = sys.argv[1]
    ckpt.save({"w": torch.arange(10.0), "step": 1}, ckpt.step_dir(root, 1))

    def pause(path):
        print("paused", path, flush=True)
        time.sleep(600)

    ckpt.save({"w": torch.arange(10.0) * 2, "step": 2}, ckpt.step_dir(root, 2), after_write=pause)
    """
)


def test_a_save_killed_half_way_leaves_the_previous_checkpoint(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = child.stdout.readline()
        assert line.startswith("paused"), line + child.stderr.read()
        partial = line.split()[1]
        assert os.path.isfile(partial)  # the data of step 2 is on disk, half a checkpoint
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert ckpt.latest(tmp_path) == ckpt.step_dir(tmp_path, 1)
    assert any(p.name.startswith(".step_00000002.partial-") for p in tmp_path.iterdir())
    state = ckpt.load({"w": torch.zeros(10), "step": 0}, ckpt.latest(tmp_path))
    assert state["step"] == 1 and torch.equal(state["w"], torch.arange(10.0))


def test_latest_orders_by_step_and_is_none_when_empty(tmp_path):
    assert ckpt.latest(tmp_path / "nothing") is None
    for step in (9, 10, 100):
        ckpt.save({"step": step}, ckpt.step_dir(tmp_path, step))
    (tmp_path / "step_00000999").mkdir()  # no index: not a checkpoint
    assert ckpt.latest(tmp_path) == ckpt.step_dir(tmp_path, 100)


def test_keep_retains_the_newest_and_spares_one_being_read(tmp_path):
    for step in range(1, 4):
        ckpt.save({"step": step}, ckpt.step_dir(tmp_path, step), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003"]
    (ckpt.step_dir(tmp_path, 2) / ".reading-test").touch()  # what load() leaves while it reads
    ckpt.save({"step": 4}, ckpt.step_dir(tmp_path, 4), keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000004"]
    assert ckpt.load({"step": 0}, ckpt.step_dir(tmp_path, 2))["step"] == 2


def test_a_failed_write_commits_nothing(tmp_path):
    def fail(path):
        raise OSError("disk full")

    with pytest.raises(ckpt.CheckpointError, match="rank 0: OSError: disk full"):
        ckpt.save({"w": torch.ones(3)}, tmp_path / "c", after_write=fail)
    assert list(tmp_path.iterdir()) == []  # the temporary directory is removed too


def test_a_checkpoint_being_read_survives_retention(tmp_path):
    from ckpt.files import reading

    old = ckpt.save({"step": 1}, ckpt.step_dir(tmp_path, 1))
    with reading(old):  # what load() holds while it reads
        ckpt.save({"step": 2}, ckpt.step_dir(tmp_path, 2), keep=1)
        assert old.is_dir()
    assert not any(p.name.startswith(".reading-") for p in old.iterdir())
    ckpt.save({"step": 3}, ckpt.step_dir(tmp_path, 3), keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000003"]

"""Fault injection against ``trainer train --nproc 2``, as a cluster produces faults: a rank killed, a rank
stopped, a rank killed while saving, SIGTERM to the launcher, a corrupt newest checkpoint, data outside
the vocabulary, two "nodes" that do not share the checkpoint storage, and a full disk (a small tmpfs,
when running as root).

Each case asserts the exit code (:mod:`trainer.exits`), the one-line message, and that no committed
checkpoint was lost or changed (every complete checkpoint still verifies). Faults are injected on
events (a checkpoint committed, a metrics line written), and waits are bounded generously; nothing
asserts a duration. Faults inside a rank (dying during a save, writing to node-local storage) are
injected by a ``sitecustomize`` module that the test puts first on the ranks' path: it wraps
``safetensors.torch.save_file`` in rank 1 only.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import ckpt

BOUND_S = 1200  # outer bound on every wait for an event: only a hang reaches it, however loaded the machine
BASE = ["--nproc", "2", "--seq-len", "32", "--micro-batch", "2", "--global-batch", "4"]


@pytest.fixture(scope="module", autouse=True)
def shared_cache(tmp_path_factory):
    """One built default corpus for every run of this module."""
    os.environ["TRAINER_FAULTS_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    del os.environ["TRAINER_FAULTS_CACHE"]


def env_for(tmp: Path, inject: str | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "TRAINER_CACHE": os.environ["TRAINER_FAULTS_CACHE"], **(extra or {})}
    if inject is not None:
        site = tmp / "site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(textwrap.dedent(inject))
        env["PYTHONPATH"] = f"{site}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def trainer(
    tmp: Path, *args: str, inject: str | None = None, extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer", "train", *args],
        cwd=tmp, env=env_for(tmp, inject, extra), capture_output=True, text=True, timeout=BOUND_S,
    )  # fmt: skip


def start(tmp: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "trainer", "train", *args],
        cwd=tmp, env=env_for(tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + BOUND_S
    while not condition():
        assert time.monotonic() < deadline, f"waited {BOUND_S} s for {what}"
        time.sleep(0.05)


def steps_logged(metrics: Path) -> int:
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The process id of ``rank`` among the launcher's children (from their environment)."""

    def find() -> int | None:
        children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
        for pid in children:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(pid)
        return None

    wait_for(lambda: find() is not None, f"rank {rank} to start")
    return find()


def committed_intact(save: Path) -> list[Path]:
    """The complete checkpoints under ``save``, each verified (checksums and contents)."""
    found = [p for p in save.iterdir() if (p / "index.json").exists()] if save.exists() else []
    for path in found:
        assert ckpt.verify(path) == [], path
    return sorted(found)


def final_loss(metrics: Path) -> float:
    return json.loads(metrics.read_text().splitlines()[-1])["loss"]


def test_a_killed_rank_stops_the_job_and_a_restart_resumes_to_the_same_loss(tmp_path):
    steps = ["--steps", "40", "--save-every", "4", "--set", "train.async_save=false", "--set", "train.keep=100"]
    reference = tmp_path / "reference.jsonl"
    assert trainer(tmp_path, *BASE, *steps, "--metrics-file", str(reference)).returncode == 0

    save, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    run = start(tmp_path, *BASE, *steps, "--save", str(save), "--metrics-file", str(metrics), "--max-restarts", "1")
    wait_for(lambda: (save / "step_00000004" / "index.json").exists(), "the first checkpoint")
    victim = rank_pid(run, 1)
    os.kill(victim, signal.SIGSTOP)  # held: the run cannot reach its end before the kill
    assert steps_logged(metrics) < 40
    os.kill(victim, signal.SIGKILL)
    _, err = run.communicate(timeout=BOUND_S)
    assert run.returncode == 0, err
    assert "rank 1 died (SIGKILL); every other rank was stopped; restart 1 of 1" in err
    assert re.search(rf"resumed from {re.escape(str(save))}/step_\d+ at step \d+", err), err
    assert final_loss(metrics) == final_loss(reference)  # the restarted run retraces the same steps
    assert committed_intact(save)[-1].name == "step_00000040"


def test_a_killed_rank_without_restarts_exits_4_naming_it(tmp_path):
    save, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    run = start(tmp_path, *BASE, "--steps", "100000", "--save", str(save), "--save-every", "2",
                "--metrics-file", str(metrics))  # fmt: skip
    wait_for(lambda: (save / "step_00000002" / "index.json").exists(), "the first checkpoint")
    os.kill(rank_pid(run, 1), signal.SIGKILL)
    _, err = run.communicate(timeout=BOUND_S)
    assert run.returncode == 4, err
    assert err.strip().splitlines()[-1] == "trainer train: error: rank 1 died (SIGKILL); every other rank was stopped"
    assert committed_intact(save)


def test_a_stalled_rank_is_named_and_every_live_rank_dumps_its_stack(tmp_path):
    save, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    run = start(tmp_path, *BASE, "--steps", "100000", "--save", str(save), "--save-every", "2",
                "--metrics-file", str(metrics), "--set", "train.stall_timeout=4")  # fmt: skip
    wait_for(lambda: (save / "step_00000002" / "index.json").exists(), "the first checkpoint")
    os.kill(rank_pid(run, 1), signal.SIGSTOP)
    _, err = run.communicate(timeout=BOUND_S)
    assert run.returncode == 3, err
    assert "stalled: rank(s) [1] stopped responding" in err.strip().splitlines()[-1]
    assert "stack of rank 0:" in err, err
    assert "in _loop" in err.split("stack of rank 0:")[1]  # rank 0's main thread, waiting for rank 1
    assert committed_intact(save)


KILL_DURING_SECOND_SAVE = """
    import os, signal
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"
    if os.environ.get("RANK") == "1" and "TRAINER_RUN_DIR" in os.environ and first_attempt:
        import safetensors.torch as st
        real, calls = st.save_file, []

        def save_file(tensors, filename, *args, **kwargs):
            real(tensors, filename, *args, **kwargs)
            calls.append(filename)
            if len(calls) == 2:  # the second checkpoint: its data is written, its commit not made
                os.kill(os.getpid(), signal.SIGKILL)

        st.save_file = save_file
"""


def test_a_rank_killed_during_a_save_leaves_a_partial_that_the_restart_removes(tmp_path):
    save, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    done = trainer(tmp_path, *BASE, "--steps", "6", "--save", str(save), "--save-every", "2", "--metrics-file",
                   str(metrics), "--max-restarts", "1", "--set", "train.async_save=false",
                   inject=KILL_DURING_SECOND_SAVE)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "rank 1 died (SIGKILL)" in done.stderr
    assert f"removed {save / '.step_00000004.partial-'}" in done.stderr
    assert f"resumed from {save / 'step_00000002'} at step 2" in done.stderr
    assert [p.name for p in committed_intact(save)] == ["step_00000002", "step_00000004", "step_00000006"]
    assert not [p for p in save.iterdir() if p.name.startswith(".")]


def test_sigterm_to_the_launcher_saves_and_exits_143(tmp_path):
    save, metrics = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    run = start(tmp_path, *BASE, "--steps", "100000", "--save", str(save), "--metrics-file", str(metrics))
    wait_for(lambda: steps_logged(metrics) >= 3, "three steps")
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=BOUND_S)
    assert run.returncode == 143, err
    assert err.strip().splitlines()[-1] == "trainer train: stopped by SIGTERM after saving"
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert committed_intact(save)[-1].name == f"step_{last:08d}"


def test_a_corrupt_newest_checkpoint_is_skipped_on_resume_and_refused_when_named(tmp_path):
    save = tmp_path / "ckpt"
    first = trainer(tmp_path, *BASE, "--steps", "4", "--save", str(save), "--save-every", "2")
    assert first.returncode == 0, first.stderr
    newest = save / "step_00000004"
    victim = newest / "rank_00000.safetensors"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))

    again = trainer(tmp_path, *BASE, "--steps", "6", "--save", str(save))
    assert again.returncode == 0, again.stderr
    assert f"skipping checkpoint {newest}: cannot load {newest}" in again.stderr and "checksum mismatch" in again.stderr
    assert f"resumed from {save / 'step_00000002'} at step 2" in again.stderr

    named = trainer(tmp_path, *BASE, "--steps", "8", "--load", str(newest))
    assert named.returncode == 2, named.stderr
    line = named.stderr.strip().splitlines()[-1]
    assert line.startswith("trainer train: error: ") and f"{victim}: checksum mismatch" in line


def test_out_of_vocabulary_data_is_refused_before_any_rank_starts_naming_the_file(tmp_path):
    from trainer.data import write_dataset

    prefix = tmp_path / "wide"
    write_dataset(prefix, [list(range(250, 300)) * 20], vocab_size=1000, meta={"tokenizer": "byte"})
    done = trainer(tmp_path, *BASE, "--steps", "2", "--data", str(prefix))
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"trainer train: error: dataset {prefix}.bin holds token id 299, outside the model's vocabulary [0, 257): "
        "it was made with another tokenizer, or model.vocab_size is too small"
    )
    assert "trainer-run-" not in done.stderr


NODE_LOCAL_STORAGE = """
    import os
    if os.environ.get("RANK") == "1" and "TRAINER_RUN_DIR" in os.environ:
        import safetensors.torch as st

        def local(path):  # the same path on node 1's own disk
            return os.environ["NODE1_DISK"] + os.path.abspath(str(path))

        real_save = st.save_file

        def save_file(tensors, filename, *args, **kwargs):
            os.makedirs(os.path.dirname(local(filename)), exist_ok=True)
            real_save(tensors, local(filename), *args, **kwargs)

        st.save_file = save_file  # before ckpt imports it
        import ckpt.files as files

        real_sha, real_fsync = files.sha256_file, files.fsync_path
        files.sha256_file = lambda path: real_sha(local(path))
        files.fsync_path = lambda path: real_fsync(local(path) if os.path.exists(local(path)) else path)
"""


def test_two_nodes_without_shared_storage_fail_the_save_naming_the_missing_file(tmp_path):
    """Rank 1 plays a second node whose checkpoint directory is its own disk: it writes its file there,
    and rank 0 cannot see it when it commits."""
    save = tmp_path / "ckpt"
    done = trainer(tmp_path, *BASE, "--steps", "2", "--save", str(save), "--set", "train.async_save=false",
                   inject=NODE_LOCAL_STORAGE, extra={"NODE1_DISK": str(tmp_path / "node1")})  # fmt: skip
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert "1 of 2 data files are missing or incomplete" in line and "rank_00001.safetensors" in line
    assert "storage that rank 0 sees (a file system shared by all nodes)" in line
    assert committed_intact(save) == []
    assert list((tmp_path / "node1").rglob("rank_00001.safetensors"))  # node 1 did write it, locally


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr", "inf"], "optim.lr=inf: must be a finite number > 0"),
        (["--global-batch", "0"], "train.global_batch=0: must be >= 1 (or left out)"),
        (["--set", "train.steps=true"], "train.steps=True: must be an integer"),
        (["--nproc", "0"], "--nproc 0: must be >= 1"),
        (["--save-every", "-1"], "train.save_every=-1: must be >= 0"),
        (["--load", "/nonexistent/ckpt"], "train.load='/nonexistent/ckpt': no such checkpoint or directory"),
    ],
)
def test_invalid_settings_are_one_line_before_any_rank_starts(tmp_path, args, message):
    done = trainer(tmp_path, *args)
    assert done.returncode == 2
    assert done.stderr.strip() == f"trainer train: error: {message}"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_fails_the_save_in_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        save = disk / "ckpt"
        done = trainer(tmp_path, *BASE, "--steps", "3", "--save", str(save), "--save-every", "1",
                       "--set", "train.async_save=false")  # fmt: skip
        assert done.returncode == 2, done.stderr
        line = done.stderr.strip().splitlines()[-1]
        assert line.startswith(f"trainer train: error: cannot save {save / 'step_0000000'}") and "No space" in line
        assert [p.name for p in committed_intact(save)] == ["step_00000001"]
    finally:
        subprocess.run(["umount", str(disk)])

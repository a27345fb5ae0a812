"""The fault-handling parts of the trainer, one at a time: which non-finite steps stop a run, the stall
watchdog's verdict, an fp16 run whose loss scale overflows under ``on_nan="stop"``, and a signal that lands
on one rank between two steps.

The end-to-end faults (killed, stalled and interrupted ranks, corrupt checkpoints) are in
``integration_tests/test_faults.py``.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import threading
from unittest import mock

import pytest
import torch.distributed as dist

import ckpt
import trainer.train.loop as loop
import trainer.train.setup as run_setup
from dp_shard import LossScaler
from trainer.config import load_run_config
from trainer.data import DataError, preprocess
from trainer.exits import Interrupted, NotFinite
from trainer.train.signals import StopRequest
from trainer.train.skips import SkipCounter
from trainer.train.watchdog import Watchdog


def test_fp16_overflows_are_counted_not_fatal():
    skips = SkipCounter("stop", max_in_a_row=3, scaled=True)
    assert skips.check(1, 2.0, math.inf, skipped=True)  # the scaler found an overflow: skipped, counted
    assert not skips.check(2, 2.0, 1.0, skipped=False)
    assert skips.check(3, 2.0, math.nan, skipped=True)
    assert (skips.skipped, skips.overflows, skips.in_a_row) == (2, 2, 1)
    assert skips.summary() == "skipped steps: 2 (2 fp16 loss-scale overflows)"


def test_a_non_finite_loss_stops_even_in_fp16():
    with pytest.raises(NotFinite, match=r"step 4: the loss \(nan\) or gradient norm \(inf\) is not finite"):
        SkipCounter("stop", max_in_a_row=3, scaled=True).check(4, math.nan, math.inf, skipped=True)


def test_a_non_finite_gradient_without_a_loss_scaler_stops():
    with pytest.raises(NotFinite, match="step 1: the loss"):
        SkipCounter("stop", max_in_a_row=3, scaled=False).check(1, 2.0, math.inf, skipped=True)
    assert SkipCounter("skip", max_in_a_row=3, scaled=False).check(1, 2.0, math.inf, skipped=True)


@pytest.mark.parametrize("on_nan", ["stop", "skip"])
def test_too_many_skipped_steps_in_a_row_stop_the_run(on_nan):
    skips = SkipCounter(on_nan, max_in_a_row=3, scaled=True)
    skips.check(1, 2.0, math.inf, skipped=True)
    skips.check(2, 2.0, math.inf, skipped=True)
    with pytest.raises(NotFinite, match=r"step 3: 3 steps in a row .* \(train.max_skipped_steps=3\)"):
        skips.check(3, 2.0, math.inf, skipped=True)


def _watchdogs(world: int, timeout: float) -> tuple[list[Watchdog], list[str], threading.Event]:
    store = dist.HashStore()
    verdicts: list[str] = []
    fired = threading.Event()

    def on_stall(verdict: str) -> None:
        verdicts.append(verdict)
        fired.set()

    dogs = [Watchdog(store, r, world, timeout, on_stall=on_stall) for r in range(world)]
    return dogs, verdicts, fired


def test_the_watchdog_names_a_rank_that_stopped_responding():
    dogs, verdicts, fired = _watchdogs(3, timeout=2.0)
    for dog in dogs:
        dog.start()
    dogs[2].stop()  # rank 2's process is stopped: it neither reports progress nor is alive
    assert fired.wait(120), "no stall verdict"
    for dog in dogs[:2]:
        dog.stop()
    assert "stalled: rank(s) [2] stopped responding" in verdicts[0]
    assert "no progress for 2 s (train.stall_timeout)" in verdicts[0]


def test_the_watchdog_names_the_rank_behind_when_all_are_alive():
    dogs, verdicts, fired = _watchdogs(2, timeout=2.0)
    for dog in dogs:
        dog.start()
    while not fired.wait(0.01):  # rank 0 keeps stepping; rank 1 is alive but stuck
        dogs[0].beat()
    for dog in dogs:
        dog.stop()
    assert "stalled: rank(s) [1] made no progress" in verdicts[0]


def train_fp16_overflowing_under_stop(tmp: str) -> list[bool]:
    """fp16 from a loss scale of 2**20, where the first step's gradients overflow, with on_nan="stop"."""
    scaler = functools.partial(LossScaler, init_scale=2.0**20, backoff_factor=2.0**-8)
    overrides = {
        "model": {"preset": "tiny"},
        "train": {"steps": 4, "seq_len": 32, "micro_batch": 2, "global_batch": 4, "precision": "fp16"},
        "data": {"cache_dir": tmp},
    }
    with mock.patch.object(run_setup, "LossScaler", scaler):
        records = loop.train(load_run_config(overrides=overrides))
    return [r["skipped"] for r in records]


def test_an_fp16_overflow_does_not_stop_a_run_under_on_nan_stop(run_ranks, tmp_path):
    skipped = run_ranks(1, train_fp16_overflowing_under_stop, str(tmp_path))[0]
    assert skipped == [True, False, False, False]


def test_a_non_utf8_input_leaves_nothing_behind_and_the_fixed_rerun_works(tmp_path):
    good, bad = tmp_path / "a.txt", tmp_path / "b.txt"
    good.write_text("first document\n")
    bad.write_bytes(b"caf\xe9 latin-1\n")
    with pytest.raises(DataError, match=r"input .*b.txt is not UTF-8 text \(invalid byte at offset 3\)"):
        preprocess([good, bad], tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]
    bad.write_text("café\n")
    ds = preprocess([good, bad], tmp_path / "out", progress=False)
    assert len(ds) == 2 and ds.max_token_id == max(b for b in "café".encode())


def test_a_changed_input_not_read_yet_does_not_block_resuming(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text('{"text": "one"}\n')
    second.write_text('{"text": "two"}\n{"text": "\\udcff"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"b\.jsonl:3"):
        preprocess([first, second], tmp_path / "out", progress=False)
    second.write_text('{"text": "two"}\n')  # fixed after the failed run, which had not finished reading it
    notes = []
    ds = preprocess([first, second], tmp_path / "out", progress=False, log=notes.append)
    assert [bytes(ds[i].astype("u1")).decode() for i in range(len(ds))] == ["one", "two"]
    assert any("inputs not read yet" in n for n in notes)


def train_signalled_after_agreeing(tmp: str) -> tuple[int, int]:
    """SIGTERM to rank 0 only, right after the ranks agreed at the end of step 2 (the moment where a
    rank that acted on its own signal would stop and save while the others start step 3)."""
    agree, calls = StopRequest.agree, []

    def agree_then_signal(self, device):
        agree(self, device)
        calls.append(1)
        if dist.get_rank() == 0 and len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    overrides = {
        "model": {"preset": "tiny"},
        "train": {"steps": 8, "seq_len": 32, "micro_batch": 2, "global_batch": 4, "save": f"{tmp}/ckpt"},
        "data": {"cache_dir": tmp},
    }
    with mock.patch.object(StopRequest, "agree", agree_then_signal):
        try:
            loop.train(load_run_config(overrides=overrides))
        except Interrupted as stop:
            return stop.exit_code, len(calls)
    raise AssertionError("the signal did not stop the run")


def test_a_signal_after_the_steps_agreement_stops_every_rank_after_the_same_step(run_ranks, tmp_path):
    """Rank 0 sees its signal only at the next agreement: both ranks stop and save after step 3 together
    (a rank that stopped alone would leave the other waiting in step 4's collectives)."""
    outcomes = run_ranks(2, train_signalled_after_agreeing, str(tmp_path))
    assert outcomes == [(128 + signal.SIGTERM, 3)] * 2
    assert ckpt.latest(tmp_path / "ckpt") == ckpt.step_dir(tmp_path / "ckpt", 3)

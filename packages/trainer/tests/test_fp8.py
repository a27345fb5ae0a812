"""fp8 training on the torch backend (torchao's float8 matmuls in the transformer layers' linear layers),
which runs on CPUs: it learns, tracks bf16, splits over TP with sequence parallelism, and resumes from
its checkpoints with the same losses.

Tolerance against bf16 and across layouts: rtol 1e-2 per step. e4m3 keeps 3 mantissa bits (rounding
error up to 6% of an element, about 2% rms); a matmul output averages it over its 64 to 128 terms and
the loss over all tokens, which leaves some 1e-3 (measured: 6e-4 on this model); with TP each rank scales
its own weight shard (its own amax), so the rounding differs from the one-process run by the same order.
A missing reduction or a wrong scale moves the loss by far more (tens of percent)."""

import pytest

from trainer.config import load_run_config
from trainer.train.loop import train

pytest.importorskip("torchao.float8")

STEPS, K = 6, 3


def losses(overrides: dict, tmp: str) -> list[float]:
    base = {
        "model": {"preset": "tiny"},
        "train": {"steps": STEPS, "seq_len": 32, "micro_batch": 2, "global_batch": 4, "seed": 5},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1},
        "data": {"cache_dir": tmp},
    }
    for section, values in overrides.items():
        base.setdefault(section, {}).update(values)
    return [r["loss"] for r in train(load_run_config(overrides=base))]


def test_fp8_learns_and_tracks_bf16(run_ranks, tmp_path):
    bf16 = run_ranks(1, losses, {"train": {"precision": "bf16"}}, str(tmp_path))[0]
    fp8 = run_ranks(1, losses, {"train": {"precision": "fp8"}}, str(tmp_path))[0]
    assert fp8[-1] < fp8[0] - 0.5
    assert fp8 == pytest.approx(bf16, rel=1e-2)
    assert fp8 != bf16  # the fp8 matmuls ran: their rounding is not bf16's


def test_fp8_at_tp2_with_sequence_parallelism_matches_one_process(run_ranks, tmp_path):
    fp8 = {"train": {"precision": "fp8"}}
    reference = run_ranks(1, losses, fp8, str(tmp_path))[0]
    split = {"train": {"precision": "fp8", "sequence_parallel": True}, "parallel": {"tp": 2}}
    for rank_losses in run_ranks(2, losses, split, str(tmp_path)):
        assert rank_losses == pytest.approx(reference, rel=1e-2)


def test_fp8_resumes_from_its_checkpoint_with_the_same_losses(run_ranks, tmp_path):
    """Current scaling keeps no state: the checkpoint is bf16's, and the resumed run repeats the
    uninterrupted one (rtol 2e-5, as for fp32 resumption: the same computation in the same order)."""
    cache, save = str(tmp_path / "cache"), str(tmp_path / "ckpt")
    full = run_ranks(1, losses, {"train": {"precision": "fp8"}}, cache)[0]
    head = run_ranks(1, losses, {"train": {"precision": "fp8", "save": save, "exit_interval": K}}, cache)[0]
    tail = run_ranks(1, losses, {"train": {"precision": "fp8", "save": save, "load": save}}, cache)[0]
    assert len(head) == K and head + tail == pytest.approx(full, rel=2e-5)

"""HSDP (``parallel.dp_shard`` with ``train.zero=3``) and ZeRO-3 with MoE experts in the training loop,
against the one-process run; and checkpoints that reshard between them and every other mode.

The same model, seed, global batches and AdamW schedule as ``test_train_parity.py``. HSDP 2x2 shards
each parameter over two adjacent data-parallel ranks and replicates it across the two shard groups;
ZeRO-3 with experts shards the dense parameters over dp_cp and the experts over edp. Tolerance: rtol
2e-5 on each step's loss (fp32), as there: the splits only reorder sums, and a wrong reduction (a
gradient averaged over the wrong count, a replica left out) is off by far more. A resumed run (stopped
at step K, loaded at another layout or mode) continues with the same losses as the uninterrupted run:
parameters and AdamW's moments come back whatever layout saved them.
"""

import pytest

from trainer.config import load_run_config
from trainer.train.loop import train

STEPS, K = 10, 4
MOE = {"preset": "tiny-moe"}


def run_training(overrides: dict, tmp: str | None = None):
    base = {
        "model": {"preset": "tiny"},
        "train": {"steps": STEPS, "seq_len": 32, "micro_batch": 2, "global_batch": 8, "seed": 5},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "clip_grad": 1.0},
        "data": {"cache_dir": tmp} if tmp else {},
    }
    for section, values in overrides.items():
        base.setdefault(section, {}).update(values)
    return [r["loss"] for r in train(load_run_config(overrides=base))]


HSDP = {"dp_shard": 2}
LAYOUTS = {
    "hsdp-2x2": (4, {"parallel": HSDP, "train": {"zero": 3}}),
    "hsdp-2x2-tp2-sp": (8, {"parallel": {"tp": 2, **HSDP}, "train": {"zero": 3, "sequence_parallel": True}}),
    "hsdp-2x2-pp2": (8, {"parallel": {"pp": 2, **HSDP}, "train": {"zero": 3}}),
    "zero3-moe-ep2-dp4": (4, {"model": MOE, "parallel": {"ep": 2}, "train": {"zero": 3}}),
    "hsdp-2x2-moe-ep2": (4, {"model": MOE, "parallel": {"ep": 2, **HSDP}, "train": {"zero": 3}}),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_losses_equal_the_one_process_run(run_ranks, tmp_path, layout):
    world, overrides = LAYOUTS[layout]
    model = {"model": overrides["model"]} if "model" in overrides else {}
    reference = run_ranks(1, run_training, model, str(tmp_path))[0]
    assert reference[-1] < reference[0]
    for rank_losses in run_ranks(world, run_training, overrides, str(tmp_path)):
        assert rank_losses == pytest.approx(reference, rel=2e-5)


CASES = {
    "hsdp-2x2-to-ddp-dp2": ((4, {"parallel": HSDP, "train": {"zero": 3}}), (2, {"parallel": {"dp": 2}})),
    "zero1-dp4-to-hsdp-2x2": ((4, {"train": {"zero": 1}}), (4, {"parallel": HSDP, "train": {"zero": 3}})),
    "hsdp-2x2-to-zero3-dp2": ((4, {"parallel": HSDP, "train": {"zero": 3}}), (2, {"train": {"zero": 3}})),
    # experts sharded over edp=2 by ZeRO-3 (their fused [gate; up] split into gate and up), loaded by ZeRO-1
    # at EP1, and back
    "zero3-moe-ep2-dp4-to-zero1-moe-dp2": (
        (4, {"model": MOE, "parallel": {"ep": 2}, "train": {"zero": 3}}),
        (2, {"model": MOE, "train": {"zero": 1}}),
    ),
    "moe-dp2-to-hsdp-2x2-moe-ep2": (
        (2, {"model": MOE}),
        (4, {"model": MOE, "parallel": {"ep": 2, **HSDP}, "train": {"zero": 3}}),
    ),
}


def with_save(overrides: dict, save: str, *, exit_interval: int | None = None, load: bool = False) -> dict:
    out = {k: dict(v) for k, v in overrides.items()}
    out.setdefault("train", {}).update(save=save, exit_interval=exit_interval, load=save if load else None)
    return out


@pytest.mark.parametrize("case", CASES)
def test_resumed_run_continues_with_the_same_losses(run_ranks, tmp_path, case):
    (world_a, first), (world_b, second) = CASES[case]
    cache = str(tmp_path / "cache")
    model = {"model": first["model"]} if "model" in first else {}
    full = run_ranks(1, run_training, model, cache)[0]
    save = str(tmp_path / "ckpt")
    head = run_ranks(world_a, run_training, with_save(first, save, exit_interval=K), cache)[0]
    tail = run_ranks(world_b, run_training, with_save(second, save, load=True), cache)[0]
    assert len(head) == K and len(tail) == STEPS - K
    assert head + tail == pytest.approx(full, rel=2e-5)

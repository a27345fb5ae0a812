"""HSDP (``parallel.dp_shard`` with ``train.zero=3``) and ZeRO-3 with MoE experts in the training loop,
against the one-process run; and checkpoints that reshard between them and every other mode.

The same model, seed, global batches and AdamW schedule as ``test_train_parity.py``. HSDP 2x2 shards
each parameter over two adjacent data-parallel ranks and replicates it across the two shard groups;
ZeRO-3 with experts shards the dense parameters over dp_cp and the experts over edp. Tolerance: rtol
2e-5 on each step's loss (fp32), as there: the splits only reorder sums, and a wrong reduction (a
gradient averaged over the wrong count, a replica left out) is off by far more. A resumed run (stopped
at step K, loaded at another layout or mode) continues with the same losses as the uninterrupted run:
parameters and AdamW's moments come back whatever layout saved them. And the bytes one HSDP step
moves on each axis equal the analytic formula, with one reduction per step whatever the micro-batches.
"""

import numpy as np
import pytest
import torch.distributed as dist

import pstate
from dp_shard.fully_shard import sharded_state
from pstate.comm import CommRecorder
from trainer.config import check_run, load_run_config
from trainer.train import train_step
from trainer.train.loop import train
from trainer.train.setup import setup

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
    "hsdp-2x2-cp2": (8, {"parallel": {"cp": 2, **HSDP}, "train": {"zero": 3}}),  # shard groups hold their CP ranks
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


def hsdp_ops(microbatches: int) -> tuple[dict, int]:
    """The second step's payload bytes and calls per (axis, op) under HSDP 2x2, and the padded parameter count."""
    overrides = {
        "model": {"preset": "tiny", "vocab_size": 257},
        "parallel": HSDP,
        "train": {"seq_len": 16, "micro_batch": 2, "global_batch": 2 * microbatches * 4, "seed": 3, "zero": 3},
    }
    cfg = load_run_config(overrides=overrides)
    with pstate.initialize(cfg.parallel) as ps:
        run = setup(cfg, ps, cfg.model, check_run(cfg, dist.get_world_size()))
        padded = sum(u.padded for c in run.chunks for u in sharded_state(c).units)
        recorder = CommRecorder.for_state(ps)
        for step in range(2):
            rows = np.random.default_rng(step).integers(0, 257, (2 * microbatches * 4, 17))
            recorder.clear()
            with recorder:
                train_step(run, np.split(np.split(rows, 4)[ps.dp.rank], microbatches))
        ops: dict = {}
        for r in recorder.records:
            if r.axis in ("dp_shard", "dp_replicate") and r.bytes > 8:  # not the norm's scalar
                total = ops.setdefault((r.axis, r.op), [0, 0])
                total[0] += r.bytes
                total[1] += 1
    return ops, padded


def test_hsdp_reduces_each_gradient_once_per_step_at_the_analytic_bytes(run_ranks):
    """HSDP 2x2, 1 and 3 micro-batches: all-gathers of the fp32 shards for each micro-batch's forward and
    backward within the shard group (``2 m 4P``), one reduce-scatter of ``4P`` there and one all-reduce of
    ``4P/2`` across the replicas per step, whatever the micro-batch count (P: the units' padded sizes)."""
    for m in (1, 3):
        for ops, padded in run_ranks(4, hsdp_ops, m):
            assert ops[("dp_shard", "all_gather")][0] == 2 * m * 4 * padded
            assert ops[("dp_shard", "reduce_scatter")][0] == 4 * padded
            assert ops[("dp_replicate", "all_reduce")][0] == 4 * padded // 2
            assert ops[("dp_shard", "reduce_scatter")][1] == ops[("dp_replicate", "all_reduce")][1]
            assert set(ops) == {
                ("dp_shard", "all_gather"),
                ("dp_shard", "reduce_scatter"),
                ("dp_replicate", "all_reduce"),
            }

"""The trainer's communication per step, recorded by ``pstate.comm``: the data-parallel gradient reduction
happens once per step whatever the number of micro-batches, in every mode, and ``--comm-report`` puts
each step's bytes per axis in the metrics (and the start-up note gives the bytes per parameter).

At DP=2 each mode runs two steps of ``train_step`` with 1 and with 3 micro-batches per rank and records
the second. The reductions on the ``dp`` axis (all-reduce and reduce-scatter: bytes and calls) must be
the same for both counts. For DDP they must equal the formula: one all-reduce of the fp32 gradient
buffer, ``4P`` bytes, plus the 8-byte all-reduce of the logged loss (sum and count).
"""

import io
import json

import numpy as np
import pytest
import torch.distributed as dist

import pstate
from pstate.comm import CommRecorder
from trainer.config import check_run, load_run_config
from trainer.train import train, train_step
from trainer.train.setup import setup

SEQ, VOCAB, MICRO_BATCH = 16, 257, 2  # the embedded corpus's byte tokenizer


def config(zero: int, microbatches: int, data: dict | None = None, **train_fields):
    overrides = {
        "data": data or {},
        "model": {"preset": "tiny", "vocab_size": VOCAB},
        "parallel": {"dp": 2},
        "train": {
            "seq_len": SEQ,
            "micro_batch": MICRO_BATCH,
            "global_batch": MICRO_BATCH * microbatches * 2,
            "seed": 3,
            "zero": zero,
            **train_fields,
        },
    }
    return load_run_config(overrides=overrides)


def dp_ops(zero: int, microbatches: int) -> tuple[dict, int]:
    """The second step's totals per operation on the dp axis, and the model's parameter count."""
    cfg = config(zero, microbatches)
    plan = check_run(cfg, dist.get_world_size())
    assert plan.microbatches == microbatches
    with pstate.initialize(cfg.parallel) as ps:
        numel = None
        run = setup(cfg, ps, cfg.model, plan)
        if run.engine.zero != 3:
            numel = sum(p.numel() for c in run.chunks for p in c.parameters())
        recorder = CommRecorder.for_state(ps)
        for step in range(2):
            generator = np.random.default_rng(step)
            rows = generator.integers(0, VOCAB, (MICRO_BATCH * microbatches * 2, SEQ + 1))
            mine = np.split(rows, 2)[ps.dp.rank]
            recorder.clear()
            with recorder:
                _, _, skipped = train_step(run, np.split(mine, microbatches))
            assert not skipped
        ops = {op: (int(v["bytes"]), int(v["calls"])) for op, v in recorder.by_op("dp").items()}
        return ops, numel


def both(zero: int) -> dict[int, tuple[dict, int]]:
    return {m: dp_ops(zero, m) for m in (1, 3)}


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_gradients_are_reduced_once_per_step_whatever_the_micro_batch_count(run_ranks, zero):
    for result in run_ranks(2, both, zero):
        (one, numel), (three, _) = result[1], result[3]
        reductions = ("all_reduce", "reduce_scatter")
        assert {k: v for k, v in one.items() if k in reductions} == {k: v for k, v in three.items() if k in reductions}
        if zero == 0:
            assert one["all_reduce"][0] == 4 * numel + 8
        if zero == 3:  # parameters are gathered for each micro-batch's forward and backward
            assert three["all_gather"][0] == 3 * one["all_gather"][0]
        else:
            assert one.get("all_gather") == three.get("all_gather")


def report(tmp: str) -> tuple[list[dict], str]:
    cfg = config(1, 2, {"cache_dir": tmp}, steps=2, comm_report=True, metrics_file=f"{tmp}/metrics.jsonl")
    stream = io.StringIO()
    return train(cfg, stream=stream), stream.getvalue()


def test_comm_report_writes_bytes_per_axis(run_ranks, tmp_path):
    records, printed = run_ranks(2, report, str(tmp_path))[0]
    assert "comm (rank 0): dp " in printed
    # ZeRO-1 at d=2, fp32 parameters that are their own masters: 4 + (4 + 4/d) + 8/d, plus bucket padding
    assert "bytes per parameter (rank 0, zero=1, dp_cp=2): params 4.00 + grads 6.00 + optimizer 4.00" in printed
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["comm_dp_bytes"] for r in lines] == [r["comm_dp_bytes"] for r in records]
    assert records[0]["comm_dp_bytes"] == records[1]["comm_dp_bytes"] > 0
    assert records[0]["comm_dp_s"] > 0

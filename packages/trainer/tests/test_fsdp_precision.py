"""ZeRO-3 in bf16: parameters gathered in bf16, fp32 sharded master weights and AdamW state, gradients
reduced in fp32 (default) or bf16 (``train.grad_reduce_dtype``); the losses agree with the fp32 run.

Tolerance: rtol 2e-3 on each of ten steps' losses against the one-process fp32 run: bf16 keeps 8
significant bits (a rounding is off by at most 2^-9 = 1.95e-3 relative); each loss is a mean over 256
tokens whose rounding errors mostly cancel, so the runs stay well inside one rounding (seen: 3.5e-4 with
fp32 reductions, 4.2e-4 with bf16 ones, and 2.2e-4 for bf16 autocast in one process). A run that drops
a rank's gradients, or gathers stale weights, moves the losses by more than that within a few steps.
"""

from unittest import mock

import pytest
import torch

from pstate import comm
from trainer.config import load_run_config
from trainer.train.loop import train

STEPS = 10


def run_training(overrides: dict, tmp: str, spy: bool = False):
    base = {
        "model": {"preset": "tiny"},
        "train": {"steps": STEPS, "seq_len": 32, "micro_batch": 2, "global_batch": 8, "seed": 5},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "clip_grad": 1.0},
        "data": {"cache_dir": tmp},
    }
    for section, values in overrides.items():
        base.setdefault(section, {}).update(values)
    seen: dict[str, set[torch.dtype]] = {"all_gather": set(), "reduce_scatter": set(), "master": set(), "adam": set()}
    real = {name: getattr(comm, name) for name in ("all_gather", "reduce_scatter")}
    real_step = torch.optim.AdamW.step

    def collective(name):
        def call(output, input, **kwargs):
            seen[name].add(input.dtype)
            return real[name](output, input, **kwargs)

        return call

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        params = [p for g in self.param_groups for p in g["params"]]
        seen["master"] |= {p.dtype for p in params}
        seen["adam"] |= {self.state[p]["exp_avg"].dtype for p in params if self.state[p]}
        return out

    patches = [mock.patch.object(comm, n, collective(n)) for n in real] if spy else []
    patches += [mock.patch.object(torch.optim.AdamW, "step", step)] if spy else []
    for patch in patches:
        patch.start()
    try:
        losses = [r["loss"] for r in train(load_run_config(overrides=base))]
    finally:
        for patch in patches:
            patch.stop()
    return losses, {k: sorted(str(d) for d in v) for k, v in seen.items()}


@pytest.mark.parametrize("reduce", ["fp32", "bf16"])
def test_bf16_zero3_gathers_bf16_keeps_fp32_masters_and_matches_fp32(run_ranks, tmp_path, reduce):
    reference = run_ranks(1, run_training, {}, str(tmp_path))[0][0]
    overrides = {"train": {"zero": 3, "precision": "bf16", "grad_reduce_dtype": reduce}}
    for losses, seen in run_ranks(2, run_training, overrides, str(tmp_path), True):
        assert losses == pytest.approx(reference, rel=2e-3)
        assert losses[-1] < losses[0] - 1.0  # it learns
        assert seen["all_gather"] == ["torch.bfloat16"]
        assert seen["reduce_scatter"] == [f"torch.{'float32' if reduce == 'fp32' else 'bfloat16'}"]
        assert seen["master"] == seen["adam"] == ["torch.float32"]

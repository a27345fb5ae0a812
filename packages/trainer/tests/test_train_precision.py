"""``train.precision = "bf16"`` with ZeRO 0/1/2: bf16 weights, fp32 main gradients, fp32 masters and AdamW state.

The tiny model trains the ten steps of ``test_train_parity`` (AdamW, warmup, cosine, clipping) at DP2.

- DDP, ZeRO-1 and ZeRO-2 in bf16 against the one-process bf16 run: rtol 1e-3 on each step's loss. Every
  layout computes the same micro-batches in bf16 and adds their fp32 gradients in another order (a few
  fp32 ulps); where that moves a master across a bf16 rounding boundary the next forward's weight
  differs by one bf16 ulp (2^-8 relative) in a handful of elements, which moves the mean loss far less
  than 2^-8 = 3.9e-3; a wrong reduction or scaling is off by far more.
- bf16 against fp32: rtol 2e-2 (5 bf16 epsilons): each forward rounds weights and activations to 8
  significant bits; the fp32 masters keep the updates, so the runs do not drift apart over ten steps.
- Resume: a bf16 ZeRO-1 run stopped after step 4 continues, at ZeRO-1 and at ZeRO-2 over 4 ranks and as
  DDP, with the uninterrupted run's losses within the same rtol 1e-3; at the same layout exactly
  (rtol 1e-6), which holds only because the checkpoint keeps the fp32 masters (bf16 weights saved as
  the model would round every master by up to 2^-9 and move the next losses by about 1e-3).
- ``grad_reduce_dtype="bf16"`` halves the gradient reduction's bytes (``comm_dp_bytes``: DDP 4N then 2N
  plus the loss's all-reduce; ZeRO-1 4N + 2N of bf16 weight gathers, then 2N + 2N) and stays within
  the bf16-vs-fp32 tolerance of the fp32 reduction.
"""

import pytest

from trainer.config import load_run_config
from trainer.errors import TrainerError
from trainer.train.loop import train

BF16 = {"train": {"precision": "bf16"}}


def run_training(overrides: dict, tmp: str, steps: int = 10) -> list[float]:
    """``test_train_parity``'s run: the tiny model, AdamW with warmup, cosine decay and clipping."""
    base = {
        "model": {"preset": "tiny"},
        "train": {"steps": steps, "seq_len": 32, "micro_batch": 2, "global_batch": 8, "seed": 5},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "clip_grad": 1.0},
        "data": {"cache_dir": tmp},
    }
    for section, values in overrides.items():
        base.setdefault(section, {}).update(values)
    return [r["loss"] for r in train(load_run_config(overrides=base))]


def with_save(overrides: dict, save: str, *, exit_interval: int | None = None, load: bool = False) -> dict:
    out = {k: dict(v) for k, v in overrides.items()}
    out["train"].update(save=save, exit_interval=exit_interval, load=save if load else None)
    return out


def at(zero: int, dp: int, extra: dict | None = None) -> dict:
    return {"parallel": {"dp": dp}, "train": {"precision": "bf16", "zero": zero, **(extra or {})}}


@pytest.fixture(scope="module")
def bf16_reference(tmp_path_factory, rank_harness):
    return rank_harness.run(1, run_training, BF16, str(tmp_path_factory.mktemp("cache")))[0]


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_bf16_weights_match_the_one_process_bf16_run_and_fp32(run_ranks, bf16_reference, tmp_path, zero):
    fp32 = run_ranks(1, run_training, {}, str(tmp_path))[0]
    assert bf16_reference == pytest.approx(fp32, rel=2e-2)
    assert bf16_reference[-1] < bf16_reference[0] - 0.3
    for losses in run_ranks(2, run_training, at(zero, 2), str(tmp_path)):
        assert losses == pytest.approx(bf16_reference, rel=1e-3)


@pytest.mark.parametrize("second", [(2, at(1, 2)), (4, at(2, 4)), (2, at(0, 2))], ids=["same", "zero2-dp4", "ddp"])
def test_bf16_resume_keeps_the_fp32_masters(run_ranks, bf16_reference, tmp_path, second):
    cache, save = str(tmp_path / "cache"), str(tmp_path / "ckpt")
    full = run_ranks(2, run_training, at(1, 2), cache)[0]
    head = run_ranks(2, run_training, with_save(at(1, 2), save, exit_interval=4), cache)[0]
    tail = run_ranks(second[0], run_training, with_save(second[1], save, load=True), cache)[0]
    assert len(head) == 4 and len(tail) == 6
    assert head + tail == pytest.approx(full, rel=1e-6 if second[1] == at(1, 2) else 1e-3)


def comm_bytes(overrides: dict, tmp: str) -> list[tuple[float, int]]:
    base = {
        "model": {"preset": "tiny"},
        "train": {"steps": 3, "seq_len": 32, "micro_batch": 2, "global_batch": 8, "seed": 5, "comm_report": True},
        "data": {"cache_dir": tmp},
    }
    for section, values in overrides.items():
        base.setdefault(section, {}).update(values)
    return [(r["loss"], r["comm_dp_bytes"]) for r in train(load_run_config(overrides=base))]


def test_bf16_gradient_reduction_halves_its_bytes(run_ranks, tmp_path):
    runs = {}
    for zero in (0, 1):
        for reduce in ("fp32", "bf16"):
            extra = {"grad_reduce_dtype": reduce}
            runs[zero, reduce] = run_ranks(2, comm_bytes, at(zero, 2, extra), str(tmp_path))[0]
            assert [loss for loss, _ in runs[zero, reduce]] == pytest.approx(
                [loss for loss, _ in runs[0, "fp32"]], rel=2e-2
            )
    for step in range(3):
        ddp, ddp_half = runs[0, "fp32"][step][1], runs[0, "bf16"][step][1]
        other = 2 * ddp_half - ddp  # DDP: 4N + other, then 2N + other (the loss's all-reduce)
        assert 0 < other < 1e-3 * ddp
        n = (ddp - ddp_half) / 2  # the gradient elements
        zero1, zero1_half = runs[1, "fp32"][step][1], runs[1, "bf16"][step][1]
        assert zero1 == pytest.approx(6 * n, rel=1e-3)  # 4N reduced, 2N of bf16 weights gathered
        assert zero1 - zero1_half == pytest.approx(2 * n, rel=1e-3)


def test_grad_reduce_dtype_is_checked():
    with pytest.raises(TrainerError, match=r"train\.grad_reduce_dtype='fp16'"):
        load_run_config(overrides={"train": {"grad_reduce_dtype": "fp16"}})

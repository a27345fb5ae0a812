"""``train.precision = "fp16"``: fp16 weights with fp32 main gradients and fp32 masters under ZeRO 0/1/2
(ZeRO-3: fp32 shards gathered in fp16), the dynamic loss scaler over the fp32 main gradients.

The tiny model trains ``test_train_parity``'s ten steps (AdamW, warmup, cosine, clipping) at DP2.

- Each micro-batch's loss is weighted by one over the global micro-batch count and the data-parallel
  reduction sums, so a rank's fp16 parameter gradients are those the one-process run computes for the
  same micro-batch, bit for bit at DP2 without TP. With the DP average applied after backward they were
  ``dp`` times larger and overflowed at the default scale 2**16 where the one-process run did not (the
  embedding's fp16 gradient reached 99,520 > 65,504 at step 5 at DP2 x TP2, against 49,760 in one
  process): that run skipped step 5 and its later losses stood 3.6% away.
- Parallel against one process, fp16 both: rtol 1e-3 on each step's loss, no step skipped. The fp16
  forward and backward of each micro-batch are the same; the fp32 sums of the micro-batches' gradients
  add in another order (a few fp32 ulps), and where that moves a master across an fp16 rounding boundary
  the next forward's weight differs by one fp16 ulp (2^-11 relative) in a few elements, which moves the
  mean loss far less than 2^-11 = 4.9e-4; a step skipped or a gradient off by the DP size is off by more.
- Gradient norms against one process: rtol 1e-2 (seen 2.9e-3 at step 5 under ZeRO-1/2). The norm is
  dominated by the embedding's gradient, which the fp16 embedding backward sums over every occurrence
  of a token in fp16 (about 2e-3 relative error for 500 occurrences, against 3e-4 in fp32); a weight one
  fp16 ulp off changes those roundings. A gradient left averaged as well (off by the DP size 2) or a
  skipped step is far outside.
- fp16 against fp32: rtol 1e-2 (20 fp16 epsilons, half the bf16 test's 2e-2 for 3 more significant
  bits): each forward rounds weights and activations to 11 significant bits; the fp32 masters keep the
  updates, so the runs do not drift apart over ten steps.
- An overflowing initial scale (2**20) skips the first step on every rank as in one process, then the
  runs match at the tolerance above; a ZeRO-1 run stopped after step 4 and resumed equals the
  uninterrupted run (rtol 1e-6: the checkpoint keeps the fp32 masters and the loss scale; a resumed run
  back at 2**20 would skip step 5 again).
- ZeRO-1 moves 6 bytes per parameter per step over DP: the fp32 gradient reduction (4) and the fp16
  weight gather (2).
- The banner's states line and the measured bytes per parameter are ``dp_shard.bytes_per_param``'s
  table for 16-bit weights: DDP 18, ZeRO-1 ``6 + 12/d``, ZeRO-2 ``2 + 16/d``; ZeRO-3 keeps fp32 shards
  that are their own masters (``16/d``).
"""

import functools
from unittest import mock

import pytest
import torch

import trainer.train.loop as loop
import trainer.train.setup as run_setup
from dp_shard import LossScaler, bytes_per_param
from trainer.config import check_run, load_run_config
from trainer.train.loop import train

FP16 = {"train": {"precision": "fp16"}}
OVERFLOWING = {"init_scale": 2.0**20, "backoff_factor": 2.0**-8}  # the first step overflows, then 2**12


def run_training(overrides: dict, tmp: str, scaler: dict | None = None) -> dict:
    """``test_train_parity``'s run; each step's loss, skip and loss scale, the weights' dtypes, and on rank 0
    the banner's lines and the measured bytes-per-parameter note."""
    base = {
        "model": {"preset": "tiny"},
        "train": {"steps": 10, "seq_len": 32, "micro_batch": 2, "global_batch": 8, "seed": 5, "on_nan": "skip"},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "clip_grad": 1.0},
        "data": {"cache_dir": tmp},
    }
    for section, values in overrides.items():
        base.setdefault(section, {}).update(values)
    seen: dict = {}

    def setup(*args, **kwargs):
        run = setup_of(*args, **kwargs)
        seen["weights"] = {str(p.dtype) for c in run.chunks for p in c.parameters()}
        seen["numel"] = sum(p.numel() for c in run.chunks for p in c.parameters())
        return run

    def banner(run, datasets):
        seen["lines"] = lines = banner_of(run, datasets)
        return lines

    def note(run):
        seen["memory"] = text = note_of(run)
        return text

    setup_of, banner_of, note_of = loop.setup, loop.banner, loop._memory_note
    scaler_cls = functools.partial(LossScaler, **(scaler or {}))
    with (
        mock.patch.object(loop, "setup", setup),
        mock.patch.object(loop, "banner", banner),
        mock.patch.object(loop, "_memory_note", note),
        mock.patch.object(run_setup, "LossScaler", scaler_cls),
    ):
        records = train(load_run_config(overrides=base))
    seen["losses"] = [r["loss"] for r in records]
    seen["skipped"] = [r["skipped"] for r in records]
    seen["scales"] = [r.get("loss_scale") for r in records]
    seen["norms"] = [r["grad_norm"] for r in records]
    seen["comm_dp_bytes"] = [r.get("comm_dp_bytes") for r in records]
    return seen


def at(zero: int, extra: dict | None = None) -> dict:
    return {"parallel": {"dp": 2}, "train": {"precision": "fp16", "zero": zero, **(extra or {})}}


@pytest.mark.parametrize(("zero", "stored"), [(0, "fp16"), (1, "fp16"), (2, "fp16"), (3, "fp32")])
def test_the_run_plan_stores_fp16_weights_except_under_zero3(zero, stored):
    plan = check_run(load_run_config(overrides=at(zero)), 2)
    assert (plan.param_dtype, plan.compute_dtype, plan.grad_reduce_dtype) == (stored, "fp16", "fp32")
    assert f"params {stored}, compute fp16" in plan.describe()


@pytest.fixture(scope="module")
def references(tmp_path_factory, rank_harness):
    """The one-process fp16 and fp32 runs."""
    cache = str(tmp_path_factory.mktemp("cache"))
    return rank_harness.run(1, run_training, FP16, cache)[0], rank_harness.run(1, run_training, {}, cache)[0]


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_fp16_weights_match_the_one_process_fp16_run_and_fp32(run_ranks, references, tmp_path, zero):
    fp16, fp32 = references
    assert fp16["weights"] == {"torch.float16"} and fp32["weights"] == {"torch.float32"}
    assert not any(fp16["skipped"]) and set(fp16["scales"]) == {2.0**16}
    assert fp16["losses"] == pytest.approx(fp32["losses"], rel=1e-2)
    assert fp16["losses"][-1] < fp16["losses"][0] - 0.3
    results = run_ranks(2, run_training, at(zero), str(tmp_path))
    for result in results:
        assert result["skipped"] == fp16["skipped"]
        assert result["losses"] == pytest.approx(fp16["losses"], rel=1e-3)
        assert result["norms"] == pytest.approx(fp16["norms"], rel=1e-2)
        assert result["weights"] == {"torch.float32" if zero == 3 else "torch.float16"}
    sixteen = {"weight_dtype": torch.float16} if zero < 3 else {"weight_dtype": torch.float32, "master_dtype": None}
    table = bytes_per_param(zero, 2, **sixteen)
    states, memory = next(line for line in results[0]["lines"] if line.startswith("states:")), results[0]["memory"]
    weights = "float16 weights 2.00" if zero < 3 else "float32 weights 2.00"  # ZeRO-3: 4 bytes over 2 ranks
    assert states.startswith(f"states: {table['total']:.2f} bytes per parameter per rank: {weights} + fp32 grad")
    assert memory.endswith(f"= {table['total']:.2f}")  # the engine's measured bytes
    assert [bytes_per_param(z, 2, weight_dtype=torch.float16)["total"] for z in (0, 1, 2)] == [18, 12, 10]


@pytest.mark.parametrize("zero", [0, 2])
def test_fp16_overflowing_scale_skips_on_every_rank_and_recovers(run_ranks, tmp_path, zero):
    """ZeRO-1 and ZeRO-3 at TP2+SP x PP2 x DP2 are ``test_train_parity``'s; here DDP and ZeRO-2 at DP2."""
    reference = run_ranks(1, run_training, FP16, str(tmp_path), OVERFLOWING)[0]
    assert reference["skipped"] == [True] + [False] * 9
    assert reference["scales"] == [2.0**12] * 10
    for result in run_ranks(2, run_training, at(zero), str(tmp_path), OVERFLOWING):
        assert result["skipped"] == reference["skipped"] and result["scales"] == reference["scales"]
        assert result["losses"][1:] == pytest.approx(reference["losses"][1:], rel=1e-3)


def with_save(overrides: dict, save: str, *, exit_interval: int | None = None, load: bool = False) -> dict:
    out = {k: dict(v) for k, v in overrides.items()}
    out["train"].update(save=save, exit_interval=exit_interval, load=save if load else None)
    return out


def test_fp16_zero1_resume_equals_the_uninterrupted_run(run_ranks, tmp_path):
    cache, save = str(tmp_path / "cache"), str(tmp_path / "ckpt")
    full = run_ranks(2, run_training, at(1), cache, OVERFLOWING)[0]
    head = run_ranks(2, run_training, with_save(at(1), save, exit_interval=4), cache, OVERFLOWING)[0]
    tail = run_ranks(2, run_training, with_save(at(1), save, load=True), cache, OVERFLOWING)[0]
    assert len(head["losses"]) == 4 and len(tail["losses"]) == 6
    assert head["skipped"] + tail["skipped"] == full["skipped"] == [True] + [False] * 9
    assert head["scales"] + tail["scales"] == full["scales"]  # the scale came back from the checkpoint
    assert head["losses"] + tail["losses"] == pytest.approx(full["losses"], rel=1e-6)


def test_fp16_zero1_reduces_fp32_gradients_and_gathers_fp16_weights(run_ranks, tmp_path):
    """Per step at DP2: the fp32 main gradients reduced (4N bytes), the fp16 weights gathered (2N)."""
    overrides = at(1, {"steps": 3, "comm_report": True})
    for result in run_ranks(2, run_training, overrides, str(tmp_path)):
        n = result["numel"]
        assert result["comm_dp_bytes"] == pytest.approx([6 * n] * 3, rel=1e-3)


def test_a_bf16_checkpoint_resumes_as_fp16_from_the_initial_scale(run_ranks, references, tmp_path):
    """A checkpoint without a loss scale (bf16) loads into an fp16 run, whose scaler starts afresh; the
    fp32 masters come back, so the run continues with the fp16 run's losses within fp16-vs-bf16 (2e-2)."""
    cache, save = str(tmp_path / "cache"), str(tmp_path / "ckpt")
    bf16 = {"parallel": {"dp": 2}, "train": {"precision": "bf16", "zero": 1}}
    run_ranks(2, run_training, with_save(bf16, save, exit_interval=4), cache)
    tail = run_ranks(2, run_training, with_save(at(1), save, load=True), cache)[0]
    assert tail["scales"] == [2.0**16] * 6 and not any(tail["skipped"])
    assert tail["losses"] == pytest.approx(references[0]["losses"][4:], rel=2e-2)

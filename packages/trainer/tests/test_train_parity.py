"""The training loop at several layouts against the one-process run: the same losses step by step;
and a run stopped at step K and resumed, at the same layout and at another, continues with the same
losses as the uninterrupted run (model, optimizer moments, step and data position come back from the
checkpoint whatever layout wrote it).

Every layout trains the same model from the same seed on the same global batches (the sampler gives
every DP size the same samples) for ``STEPS`` steps of AdamW with warmup, cosine decay and clipping.
Tolerance: rtol 2e-5 on each step's loss (fp32): the split only reorders sums, and ten AdamW steps do
not amplify the last-bit differences beyond that; a wrong reduction or split is off by far more.
"""

import functools
import math
from unittest import mock

import pytest
import torch.distributed as dist

import trainer.train.loop as loop
import trainer.train.setup as run_setup
from dp_shard import LossScaler
from trainer.config import load_run_config
from trainer.model import tied_embedding_params
from trainer.train.loop import train

STEPS = 10


def run_training(overrides: dict, tmp: str | None = None):
    base = {
        "model": {"preset": "tiny"},
        "train": {"steps": STEPS, "seq_len": 32, "micro_batch": 2, "global_batch": 8, "seed": 5},
        # a cosine schedule over a fixed horizon, so that runs of different lengths share their first steps
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "clip_grad": 1.0},
        "data": {"cache_dir": tmp} if tmp else {},
    }
    for section, values in overrides.items():
        base.setdefault(section, {}).update(values)
    cfg = load_run_config(overrides=base)
    return [r["loss"] for r in train(cfg)]


LAYOUTS = {
    "dp2": (2, {"parallel": {"dp": 2}}),
    "tp2-sp": (2, {"parallel": {"tp": 2}, "train": {"sequence_parallel": True}}),
    "pp2": (2, {"parallel": {"pp": 2}}),
    "cp2": (2, {"parallel": {"cp": 2}}),
    "cp4-hierarchical-2x2": (4, {"parallel": {"cp": 4, "cp_a2a": 2}, "train": {"cp_attention": "hierarchical"}}),
    "zero1-dp2": (2, {"parallel": {"dp": 2}, "train": {"zero": 1}}),
    "zero2-dp2": (2, {"parallel": {"dp": 2}, "train": {"zero": 2}}),
    "zero3-dp2": (2, {"parallel": {"dp": 2}, "train": {"zero": 3}}),
    "zero3-cp2-dp2": (4, {"parallel": {"cp": 2}, "train": {"zero": 3}}),
    "zero3-tp2-sp-dp2": (4, {"parallel": {"tp": 2}, "train": {"zero": 3, "sequence_parallel": True}}),
    "zero3-pp2-dp2": (4, {"parallel": {"pp": 2}, "train": {"zero": 3}}),
    "zero3-tp2-sp-pp2-dp2": (8, {"parallel": {"tp": 2, "pp": 2}, "train": {"zero": 3, "sequence_parallel": True}}),
    "zero3-pp2-vpp2-interleaved-dp2": (
        4,
        {"parallel": {"pp": 2, "vpp": 2}, "train": {"zero": 3, "pipeline_schedule": "interleaved-1f1b"}},
    ),
    "zero1-tp2-sp-dp2": (4, {"parallel": {"tp": 2}, "train": {"zero": 1, "sequence_parallel": True}}),
    "zero2-tp2-sp-pp2-dp2": (8, {"parallel": {"tp": 2, "pp": 2}, "train": {"zero": 2, "sequence_parallel": True}}),
    "tp2-sp-pp2-dp2": (8, {"parallel": {"tp": 2, "pp": 2}, "train": {"sequence_parallel": True}}),
    "pp2-vpp2-interleaved": (2, {"parallel": {"pp": 2, "vpp": 2}, "train": {"pipeline_schedule": "interleaved-1f1b"}}),
    "pp2-zero-bubble-dp2": (4, {"parallel": {"pp": 2}, "train": {"pipeline_schedule": "zero-bubble"}}),
    "pp2-pipeline-layout-3-1-dp2": (4, {"parallel": {"pp": 2, "pipeline_layout": [3, 1]}}),
    "zero1-pp2-vpp2-zb-v-tied-dp2": (
        4,
        {
            "model": {"preset": "tiny-gpt2"},
            "parallel": {"pp": 2, "vpp": 2},
            "train": {"zero": 1, "pipeline_schedule": "zb-v"},
        },
    ),
    "pp2-vpp2-zb-v-dp2": (4, {"parallel": {"pp": 2, "vpp": 2}, "train": {"pipeline_schedule": "zb-v"}}),
    "tp2-sp-pp2-vpp2-dualpipe-v": (
        4,
        {
            "parallel": {"tp": 2, "pp": 2, "vpp": 2},
            "train": {"pipeline_schedule": "dualpipe-v", "sequence_parallel": True},
        },
    ),
    "cp2-tp2-sp": (4, {"parallel": {"cp": 2, "tp": 2}, "train": {"sequence_parallel": True}}),
    "tp2-recompute-full": (2, {"parallel": {"tp": 2}, "train": {"recompute": "full"}}),
    "pp2-recompute-selective": (2, {"parallel": {"pp": 2}, "train": {"recompute": "selective"}}),
    # MoE with the preset's load-balancing loss: balanced over whole sequences (SP, CP), as in one process
    "moe-ep2-tp2-dp2": (
        4,
        {"model": {"preset": "tiny-moe"}, "parallel": {"tp": 2, "ep": 2}, "train": {"sequence_parallel": True}},
    ),
    "moe-ep2-cp2": (4, {"model": {"preset": "tiny-moe"}, "parallel": {"cp": 2, "ep": 2}}),
    # ZeRO-1/2 with experts: dense state sharded over dp_cp, expert state over edp (1 here, 2 below)
    "zero1-moe-ep2-tp2-sp-dp2": (
        4,
        {
            "model": {"preset": "tiny-moe"},
            "parallel": {"tp": 2, "ep": 2},
            "train": {"zero": 1, "sequence_parallel": True},
        },
    ),
    "zero2-moe-ep2-dp4": (4, {"model": {"preset": "tiny-moe"}, "parallel": {"ep": 2}, "train": {"zero": 2}}),
    # multi-latent attention: replicated down-projections beside head-split up-projections
    "mla-zero3-tp2-sp-dp2-recompute-selective": (
        4,
        {
            "model": {"preset": "tiny-mla"},
            "parallel": {"tp": 2},
            "train": {"zero": 3, "sequence_parallel": True, "recompute": "selective"},
        },
    ),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, rank_harness):
    return rank_harness.run(1, run_training, {}, str(tmp_path_factory.mktemp("cache")))[0]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_losses_equal_the_one_process_run(run_ranks, rank_harness, reference, tmp_path, layout):
    world, overrides = LAYOUTS[layout]
    if "model" in overrides:  # another model: its own one-process reference
        reference = run_ranks(1, run_training, {"model": overrides["model"]}, str(tmp_path))[0]
    losses = run_ranks(world, run_training, overrides, str(tmp_path))
    assert reference[-1] < reference[0]
    for rank_losses in losses:
        assert rank_losses == pytest.approx(reference, rel=2e-5)


K = 4

CASES = {
    "same-dp2": ((2, {"parallel": {"dp": 2}}), (2, {"parallel": {"dp": 2}})),
    "dp2-to-dp4": ((2, {"parallel": {"dp": 2}}), (4, {"parallel": {"dp": 4}})),
    "tp2-pp2-dp2-to-pp4-dp2": (
        (8, {"parallel": {"tp": 2, "pp": 2}, "train": {"sequence_parallel": True}}),
        (8, {"parallel": {"pp": 4}}),
    ),
    "zero1-dp2-to-zero2-dp4": (
        (2, {"parallel": {"dp": 2}, "train": {"zero": 1}}),
        (4, {"parallel": {"dp": 4}, "train": {"zero": 2}}),
    ),
    "zero3-dp2-to-zero1-dp4": (
        (2, {"parallel": {"dp": 2}, "train": {"zero": 3}}),
        (4, {"parallel": {"dp": 4}, "train": {"zero": 1}}),
    ),
    "dp2-to-zero3-dp4": ((2, {"parallel": {"dp": 2}}), (4, {"parallel": {"dp": 4}, "train": {"zero": 3}})),
    "zero3-tp2-sp-pp2-dp2-to-zero1-pp2-dp2": (
        (8, {"parallel": {"tp": 2, "pp": 2}, "train": {"zero": 3, "sequence_parallel": True}}),
        (4, {"parallel": {"pp": 2}, "train": {"zero": 1}}),
    ),
    "tp2-pp2-dp2-to-zero3-tp2-dp2": (
        (8, {"parallel": {"tp": 2, "pp": 2}}),
        (4, {"parallel": {"tp": 2}, "train": {"zero": 3}}),
    ),
    "zero1-dp2-to-tp2-dp1": ((2, {"parallel": {"dp": 2}, "train": {"zero": 1}}), (2, {"parallel": {"tp": 2}})),
    # dropout at TP2 (its masks are the one-process run's): the generator states come back with the run
    "dropout-tp2-same": (
        (2, {"model": {"preset": "tiny", "dropout": 0.1}, "parallel": {"tp": 2}}),
        (2, {"model": {"preset": "tiny", "dropout": 0.1}, "parallel": {"tp": 2}}),
    ),
    # expert state saved sharded over edp=2 with 2 experts per rank, loaded with all 4 experts per rank
    "zero1-moe-ep2-dp4-to-moe-ep1-dp2": (
        (4, {"model": {"preset": "tiny-moe"}, "parallel": {"ep": 2}, "train": {"zero": 1}}),
        (2, {"model": {"preset": "tiny-moe"}}),
    ),
    # and into ZeRO: experts split over ETP=2 at DDP, loaded into ZeRO-2 shards of 2 experts over edp=2
    "moe-tp2-sp-to-zero2-moe-ep2-dp4": (
        (2, {"model": {"preset": "tiny-moe"}, "parallel": {"tp": 2}, "train": {"sequence_parallel": True}}),
        (4, {"model": {"preset": "tiny-moe"}, "parallel": {"ep": 2}, "train": {"zero": 2}}),
    ),
}


def with_save(overrides: dict, save: str, *, exit_interval: int | None = None, load: bool = False) -> dict:
    out = {k: dict(v) for k, v in overrides.items()}
    train = out.setdefault("train", {})
    train.update(save=save, exit_interval=exit_interval, load=save if load else None)
    return out


@pytest.mark.parametrize("case", CASES)
def test_resumed_run_continues_with_the_same_losses(run_ranks, tmp_path, case):
    (world_a, first), (world_b, second) = CASES[case]
    cache = str(tmp_path / "cache")
    model = {"model": first["model"]} if "model" in first else {}  # another model: its own one-process run
    full = run_ranks(1, run_training, model, cache)[0]
    save = str(tmp_path / "ckpt")
    head = run_ranks(world_a, run_training, with_save(first, save, exit_interval=K), cache)[0]
    tail = run_ranks(world_b, run_training, with_save(second, save, load=True), cache)[0]
    assert len(head) == K and len(tail) == STEPS - K  # the resumed run continues to the total
    assert head + tail == pytest.approx(full, rel=2e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_runs_match_their_one_process_run_and_learn(run_ranks, tmp_path, precision):
    """bf16/fp16 weights over fp32 masters (fp16 with the loss scaler) at DP2 x TP2 against the same
    precision in one process. Tolerance rtol 2e-2: 16-bit matmuls round differently when the TP split
    changes the reduction order, and the rounding differs step to step; a wrong reduction is off by more
    (fp16 seen within 8e-5: a rank's fp16 gradients are the one-process run's, see test_train_fp16; with
    the DP average after backward they were twice as large, overflowed at step 5 and that skipped step
    put the later losses 3.6% away)."""
    overrides = {"train": {"precision": precision}}
    reference = run_ranks(1, run_training, overrides, str(tmp_path))[0]
    losses = run_ranks(4, run_training, {**overrides, "parallel": {"tp": 2}}, str(tmp_path))
    assert reference[-1] < reference[0] - 0.3
    for rank_losses in losses:
        assert rank_losses == pytest.approx(reference, rel=2e-2)


def train_fp16_from_an_overflowing_scale(overrides: dict, tmp: str) -> list[tuple[float, float, bool]]:
    """Each step's loss, gradient norm and whether it was skipped, in fp16 with the loss scale starting at
    2**20, where the first step's fp16 gradients overflow (from about 2**17 on they do, here); that step is
    skipped and the scale lowered to 2**12, far from overflowing, so which steps overflow does not hang on
    rounding."""
    steps = []

    def spy(*args):
        steps.append(train_step(*args))
        return steps[-1]

    train_step, scaler = loop.train_step, functools.partial(LossScaler, init_scale=2.0**20, backoff_factor=2.0**-8)
    with mock.patch.object(loop, "train_step", spy), mock.patch.object(run_setup, "LossScaler", scaler):
        train = {**overrides.get("train", {}), "precision": "fp16", "on_nan": "skip"}
        run_training({**overrides, "train": train}, tmp)
    return steps


@pytest.mark.parametrize("zero", [1, 3])
def test_fp16_zero_skips_the_same_overflowing_steps_and_matches_its_one_process_run(run_ranks, tmp_path, zero):
    """fp16 under ZeRO-1 and FSDP at TP2+SP x PP2 x DP2: the loss scaler unscales the sharded gradients and
    finds the overflow on whichever rank holds it, so every rank skips the step the one-process run skips, and the
    other steps match it. Losses: rtol 2e-2, as for the low-precision runs above. Norms: rtol 0.1: at
    step 8 the fp16 rounding under the TP split moves the norm by 7% with DDP as well (3.02 in one
    process, 3.22 at TP2 x PP2 with DDP or ZeRO-3); gradients left scaled are off by 2**12."""
    reference = run_ranks(1, train_fp16_from_an_overflowing_scale, {}, str(tmp_path))[0]
    parallel = {"parallel": {"tp": 2, "pp": 2}, "train": {"zero": zero, "sequence_parallel": True}}
    results = run_ranks(8, train_fp16_from_an_overflowing_scale, parallel, str(tmp_path))
    skipped = [s for *_, s in reference]
    assert skipped[0] and not any(skipped[1:])
    losses = [loss for loss, _, s in reference if not s]
    norms = [norm for _, norm, s in reference if not s]
    assert losses[-1] < losses[0] - 0.3
    for steps in results:
        assert [s for *_, s in steps] == skipped
        assert [loss for loss, _, s in steps if not s] == pytest.approx(losses, rel=2e-2)
        assert [norm for _, norm, s in steps if not s] == pytest.approx(norms, rel=0.1)


def test_deterministic_mode_repeats_the_losses_bit_for_bit(run_ranks, tmp_path):
    overrides = {"parallel": {"tp": 2}, "train": {"deterministic": True, "sequence_parallel": True}}
    first = run_ranks(2, run_training, overrides, str(tmp_path))
    second = run_ranks(2, run_training, overrides, str(tmp_path))
    assert first == second


def train_and_evaluate(tmp: str):
    overrides = {"train": {"eval_every": 5, "eval_steps": 2, "metrics_file": f"{tmp}/metrics.jsonl"}}
    run_training(overrides, tmp)
    import json

    return [json.loads(line) for line in open(f"{tmp}/metrics.jsonl")] if dist.get_rank() == 0 else None


def test_evaluation_reports_loss_and_perplexity(run_ranks, tmp_path):
    records = run_ranks(2, train_and_evaluate, str(tmp_path))[0]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [5, 10]
    assert all(abs(r["eval_ppl"] - math.exp(r["eval_loss"])) < 1e-6 * r["eval_ppl"] for r in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] + 0.5


# Tied embeddings across pipeline stages: the first stage's table and the last stage's copy get the
# summed gradient, are clipped by the same factor and stay bit-identical, and the losses equal the
# one-process run's, under DDP, ZeRO-1/2 and FSDP (ZeRO-3). tiny-gpt2 (tied) at PP2 x DP2 with clipping at 1.0, which
# is active in these steps (norms 2 to 4): a copy left out of the clipping drifted by 3e-3 in ten steps.
# The copies must be exactly equal: both stages apply the same update to the same values.

TIED = {"model": {"preset": "tiny-gpt2"}}


def train_and_measure_the_copies(overrides: dict, tmp: str) -> tuple[list[float], float]:
    """The losses, and the largest difference between this rank's tied table and the first stage's at
    the same DP rank (at PP2 every rank holds a table: the first stage's or the last stage's copy; under
    FSDP, this DP rank's piece of it)."""
    runs = []

    def spy(*args, **kwargs):
        runs.append(setup(*args, **kwargs))
        return runs[-1]

    setup = loop.setup
    with mock.patch.object(loop, "setup", spy):
        losses = run_training(overrides, tmp)
    (mine,) = [p.detach() for p in tied_embedding_params(runs[0].chunks)]
    tables = [None] * dist.get_world_size()
    dist.all_gather_object(tables, mine)
    first = tables[dist.get_rank() % (dist.get_world_size() // 2)]  # pp is the slowest axis
    return losses, (mine - first).abs().max().item()


@pytest.fixture(scope="module")
def tied_reference(rank_harness, tmp_path_factory):
    return rank_harness.run(1, run_training, TIED, str(tmp_path_factory.mktemp("cache")))[0]


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_tied_copies_stay_equal_and_losses_match_one_process(run_ranks, tied_reference, tmp_path, zero):
    overrides = {**TIED, "parallel": {"pp": 2}, "train": {"zero": zero}}
    results = run_ranks(4, train_and_measure_the_copies, overrides, str(tmp_path))
    for losses, gap in results:
        assert gap == 0.0
        assert losses == pytest.approx(tied_reference, rel=2e-5)


@pytest.mark.parametrize(
    "first, second",
    [
        ({"parallel": {"pp": 2}, "train": {"zero": 2}}, {"parallel": {"pp": 4}, "train": {"zero": 1}}),
        ({"parallel": {"pp": 2}, "train": {"zero": 3}}, {"parallel": {"tp": 2, "pp": 2}, "train": {"zero": 0}}),
    ],
    ids=["zero2-pp2-to-zero1-pp4", "zero3-pp2-to-tp2-pp2"],
)
def test_tied_run_resumes_at_another_layout(run_ranks, tied_reference, tmp_path, first, second):
    cache, save = str(tmp_path / "cache"), str(tmp_path / "ckpt")
    first, second = {**TIED, **first}, {**TIED, **second}
    head = run_ranks(4, run_training, with_save(first, save, exit_interval=4), cache)[0]
    tail = run_ranks(4, run_training, with_save(second, save, load=True), cache)[0]
    assert len(head) + len(tail) == STEPS
    assert head + tail == pytest.approx(tied_reference, rel=2e-5)


# Dropout (masks: test_model_dropout.py): at one stage without sequence parallelism every TP rank draws
# the one-process model's masks, so TP2 with dropout has the one-process losses; full recomputation
# draws the first forward's masks again, so its losses are exactly those without it.


def test_dropout_at_tp2_matches_one_process(run_ranks, tmp_path):
    overrides = {"model": {"preset": "tiny", "dropout": 0.1}}
    reference = run_ranks(1, run_training, overrides, str(tmp_path))[0]
    no_dropout = run_ranks(1, run_training, {}, str(tmp_path))[0]
    assert reference != pytest.approx(no_dropout, rel=1e-3)  # dropout is active
    for losses in run_ranks(2, run_training, {**overrides, "parallel": {"tp": 2}}, str(tmp_path)):
        assert losses == pytest.approx(reference, rel=2e-5)


def test_full_recompute_draws_the_same_masks(run_ranks, tmp_path):
    overrides = {
        "model": {"preset": "tiny", "dropout": 0.1},
        "parallel": {"tp": 2},
        "train": {"sequence_parallel": True},
    }
    plain = run_ranks(2, run_training, overrides, str(tmp_path))
    recomputed = run_ranks(
        2, run_training, {**overrides, "train": {"sequence_parallel": True, "recompute": "full"}}, str(tmp_path)
    )
    assert plain == recomputed

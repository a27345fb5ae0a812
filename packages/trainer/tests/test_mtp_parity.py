"""Multi-token prediction under TP (+SP) and PP against one process: one step's losses and gradients
through the pipeline executor, and a few steps of the training loop's logged losses.

Each layout runs one step of ``MICRO`` micro-batches of a model with two MTP modules through the pipeline
executor (the loss: main + ``mtp_loss_weight`` * MTP), completes the gradients the split leaves partial
(SP over TP, the tied embedding's copies over the embedding group: the last stage's copy also embeds the
MTP modules' tokens), averages over ``dp_cp`` and returns its loss parts and gradient pieces. They must
equal the one-process model's: rtol 1e-5, atol 1e-6 as in test_pipeline_parity (fp32; only the
summation order changes).
"""

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

import pstate
from trainer.config import load_run_config
from trainer.model import ModelGroups, build_chunks, model_shards, preset
from trainer.model.shards import assemble
from trainer.train import local_batch, make_executor, sync_model_parallel_grads
from trainer.train.loop import train
from trainer.train.pipeline import LossParts, stage_layout

SEED, BATCH, SEQ, VOCAB, MICRO = 7, 4, 16, 97, 2


def run_mtp(parallel: dict, schedule: str, sp: bool = False, tied: bool = False, model: str = "tiny"):
    cfg = replace(preset(model), vocab_size=VOCAB, tied_embeddings=tied, mtp_depth=2, mtp_loss_weight=0.3)
    with pstate.initialize(pstate.ParallelConfig(**parallel)) as ps:
        groups = ModelGroups.from_state(ps, sequence_parallel=sp)
        chunks = build_chunks(
            cfg, groups, pp_rank=ps.pp.rank, pp=ps.pp.size, vpp=parallel.get("vpp", 1), seed=SEED,
            layout=stage_layout(schedule, ps.pp.size),
        )  # fmt: skip
        parts = LossParts()
        executor = make_executor(chunks, ps, cfg, groups, schedule=schedule, microbatches=MICRO, parts=parts)
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(11))
        ids, labels = (t.chunk(ps.dp.size)[ps.dp.rank] for t in (tokens[:, :-1], tokens[:, 1:]))
        micro = [local_batch(i, lab, ps) for i, lab in zip(ids.chunk(MICRO), labels.chunk(MICRO))]
        result = executor.step([i for i, _ in micro], [lab for _, lab in micro])
        sync_model_parallel_grads(chunks, ps, sequence_parallel=sp)
        for chunk in chunks:
            for p in chunk.parameters():
                p.grad /= ps.dp_cp.size
                dist.all_reduce(p.grad, group=ps.dp_cp.group)
        losses = None
        if result.losses:
            losses = [torch.stack(x).mean().item() for x in (result.losses, parts.lm, parts.mtp)]
        return losses, model_shards(chunks, grads=True)


CASES = {
    "tp2": (dict(tp=2), "1f1b", {}),
    "tp2-sp": (dict(tp=2), "1f1b", dict(sp=True)),
    "pp2-tied": (dict(pp=2), "1f1b", dict(tied=True)),
    # a V layout: rank 0 holds the first and the last stage, and both copies of the tied embedding
    "pp2-zb-v-tied": (dict(pp=2, vpp=2), "zb-v", dict(tied=True)),
    "tp2-sp-pp2-tied": (dict(tp=2, pp=2), "1f1b", dict(sp=True, tied=True)),
    "pp2-dp2-tied": (dict(pp=2, dp=2), "1f1b", dict(tied=True)),  # each DP rank's MTP mean, averaged
    # MoE every 2nd layer: the first MTP block (global layer 4) is a mixture of experts, the second dense
    "moe-tp2-sp": (dict(tp=2), "1f1b", dict(sp=True, model="tiny-moe")),
}


@pytest.mark.parametrize("case", CASES)
def test_mtp_losses_and_gradients_equal_the_one_process_model(run_ranks, case):
    parallel, schedule, options = CASES[case]
    world = parallel.get("tp", 1) * parallel.get("pp", 1) * parallel.get("dp", 1)
    reference = {k: v for k, v in options.items() if k in ("tied", "model")}
    ((ref_losses, ref),) = run_ranks(1, run_mtp, {}, "1f1b", **reference)
    assert ref_losses[0] == pytest.approx(ref_losses[1] + 0.3 * ref_losses[2], rel=1e-6)
    assert ref_losses[2] > 0
    results = run_ranks(world, run_mtp, parallel, schedule, **options)
    last = [losses for losses, _ in results if losses is not None]  # the last stage's ranks
    mean = [sum(x) / len(last) for x in zip(*last)]  # over DP (equal at every TP rank)
    assert mean == pytest.approx(ref_losses, rel=1e-5)
    assert set().union(*(shards for _, shards in results)) == set(ref)
    assert any(key.startswith("mtp.1.block.") for key in ref)
    assert ("mtp.0.block.mlp.experts.fc2" in ref) == (options.get("model") == "tiny-moe")
    for key, full in ref.items():
        got = assemble([shards[key] for _, shards in results if key in shards])
        torch.testing.assert_close(got, full.data, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{case} {key}: {m}")


def train_with_mtp(overrides: dict, tmp: str) -> list[float]:
    """Four steps of the training loop with MTP (tied embeddings, so that every layout runs): each step's
    logged main loss and MTP loss, one after the other."""
    base = {
        "model": {"preset": "tiny", "tied_embeddings": True, "mtp_depth": 2, "mtp_loss_weight": 0.3},
        "train": {"steps": 4, "seq_len": 16, "micro_batch": 2, "global_batch": 4, "seed": 5},
        "optim": {"lr": 3e-3, "warmup_steps": 1, "clip_grad": 1.0},
        "data": {"cache_dir": tmp},
    }
    for section, values in overrides.items():
        base.setdefault(section, {}).update(values)
    return [x for r in train(load_run_config(overrides=base)) for x in (r["loss"], r["mtp_loss"])]


TRAIN_LAYOUTS = {
    "tp2-sp": {"parallel": {"tp": 2}, "train": {"sequence_parallel": True}},
    "pp2": {"parallel": {"pp": 2}},
}


@pytest.mark.parametrize("layout", TRAIN_LAYOUTS)
def test_training_loop_logs_the_main_and_mtp_losses_of_the_one_process_run(run_ranks, tmp_path, layout):
    # the same cache directory: the corpus is built once
    (ref,) = run_ranks(1, train_with_mtp, {}, str(tmp_path))
    results = run_ranks(2, train_with_mtp, TRAIN_LAYOUTS[layout], str(tmp_path))
    assert ref[-2] < ref[0] and ref[-1] < ref[1]  # both losses fall
    for got in results:  # rtol 2e-5 as test_train_parity: a few AdamW steps keep the last-bit differences
        assert got == pytest.approx(ref, rel=2e-5)


def test_mtp_run_resumes_at_another_layout(run_ranks, tmp_path):
    """Two steps at TP2+SP with ZeRO-1, saved; resumed at PP2: the MTP modules' tensors and moments come
    back by their layout-free names, and the four steps' losses are the one-process run's."""
    cache, save = str(tmp_path / "cache"), str(tmp_path / "ckpt")
    (full,) = run_ranks(1, train_with_mtp, {}, cache)
    first = {"parallel": {"tp": 2}, "train": {"sequence_parallel": True, "zero": 1, "save": save, "exit_interval": 2}}
    (head, _) = run_ranks(2, train_with_mtp, first, cache)
    (_, tail) = run_ranks(2, train_with_mtp, {"parallel": {"pp": 2}, "train": {"load": save}}, cache)
    assert len(head) == len(tail) == 4  # two steps of (loss, mtp_loss) each
    assert head + tail == pytest.approx(full, rel=2e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_mtp_matches_its_one_process_run(run_ranks, tmp_path, precision):
    """Autocast (the MTP modules under the run's autocast too; fp16 with the loss scaler) at TP2+SP against
    the same precision in one process, rtol 2e-2 as test_train_parity's low-precision runs (16-bit matmuls
    round differently when the split reorders sums); both stay near the fp32 run (the logged losses are
    unscaled)."""
    cache, overrides = str(tmp_path), {"train": {"precision": precision}}
    (fp32,) = run_ranks(1, train_with_mtp, {}, cache)
    (reference,) = run_ranks(1, train_with_mtp, overrides, cache)
    tp2 = {"parallel": {"tp": 2}, "train": {"precision": precision, "sequence_parallel": True}}
    for losses in run_ranks(2, train_with_mtp, tp2, cache):
        assert losses == pytest.approx(reference, rel=2e-2)
    assert reference == pytest.approx(fp32, rel=5e-2)

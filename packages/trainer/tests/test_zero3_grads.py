"""ZeRO-3 (FSDP) combined with TP + SP, PP (1F1B and interleaved) and tied embeddings: one training step's
gradients, as the loop completes them (sequence-parallel pieces summed over TP, a tied embedding's two
copies over the embedding group), and its global gradient norm, against the one-process run.

Each layout runs ``train_step`` once on the same global batch (several micro-batches per rank, so FSDP
accumulates gradients over interleaved forwards and backwards), without clipping; the pieces' gradients
are gathered over ``dp_cp`` and compared, named piece by named piece, with the one-process model's.
Tolerance as in test_pipeline_parity (rtol 1e-5, atol 1e-6, fp32; only summation order changes). The
norm checks that clipping counts TP-split gradients over TP, replicated ones and the tied copy once.
"""

import numpy as np
import pytest
import torch
import torch.distributed as dist

import pstate
from dp_shard import parameter_shards
from trainer.config import check_run, load_run_config
from trainer.model import model_shards
from trainer.model.shards import assemble
from trainer.train import train_step
from trainer.train.setup import setup

BATCH, SEQ, VOCAB, MICRO_BATCH = 16, 16, 97, 2


def one_step(model: str, parallel: dict, train: dict):
    """This rank's loss, the global gradient norm and its gradient pieces after one step."""
    overrides = {
        "model": {"preset": model, "vocab_size": VOCAB},
        "parallel": parallel,
        "train": {"seq_len": SEQ, "micro_batch": MICRO_BATCH, "global_batch": BATCH, "seed": 3, **train},
        "optim": {"clip_grad": 0.0},  # the norm is measured, the gradients left as they are
    }
    cfg = load_run_config(overrides=overrides)
    plan = check_run(cfg, dist.get_world_size())
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(11)).numpy()
    with pstate.initialize(cfg.parallel) as ps:
        run = setup(cfg, ps, cfg.model, plan)
        rows = np.split(tokens, ps.dp.size)[ps.dp.rank]
        loss, norm, skipped = train_step(run, np.split(rows, plan.microbatches))
        assert not skipped
        return loss, norm, fsdp_grads(run) if run.engine.zero == 3 else model_shards(run.chunks, grads=True)


def fsdp_grads(run):
    """Each named piece of the gradient, from this rank's flat pieces gathered over ``dp_cp``."""
    out = {}
    for i, chunk in enumerate(run.chunks):
        local = parameter_shards(chunk)
        for name, piece in chunk.named_parameters():
            shard = local[name]
            full = torch.zeros(shard.global_shape).reshape(-1)
            full[shard.flat_range[0] : shard.flat_range[1]] = piece.grad
            dist.all_reduce(full, group=run.ps.dp_cp.group)
            out.update({p.name: p.shard(full.view(shard.global_shape)) for p in run.pieces[f"chunk{i}.{name}"]})
    return out


LAYOUTS = {
    "tp2-sp-dp2": (4, "tiny", {"tp": 2}, {"sequence_parallel": True}),
    "tied-tp2-sp-pp2-dp2": (8, "tiny-gpt2", {"tp": 2, "pp": 2}, {"sequence_parallel": True}),
    "tied-pp2-vpp2-interleaved-dp2": (4, "tiny-gpt2", {"pp": 2, "vpp": 2}, {"pipeline_schedule": "interleaved-1f1b"}),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_zero3_gradients_and_norm_equal_the_one_process_run(run_ranks, layout):
    world, model, parallel, train = LAYOUTS[layout]
    ((ref_loss, ref_norm, ref),) = run_ranks(1, one_step, model, {}, {})
    results = run_ranks(world, one_step, model, parallel, {**train, "zero": 3})
    for loss, norm, _ in results:
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert norm == pytest.approx(ref_norm, rel=1e-5)
    assert set().union(*(shards for *_, shards in results)) == set(ref)
    for key, full in ref.items():
        got = assemble([shards[key] for *_, shards in results if key in shards])
        torch.testing.assert_close(got, full.data, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")

"""A hybrid Mamba-2 model (``tiny-hybrid``: Mamba, attention, Mamba, MLP) split over TP, SP, CP and PP
against the one-process model.

Each layout builds the model from the same seed, runs one forward and backward on its part of a fixed
batch and reduces gradients as the training loop does (mean over ``dp_cp``; SP-replicated norms summed
over TP); every gradient piece, by its layout-free name, and the loss must equal the one-process model's.
TP splits the Mamba heads and groups; CP trades the sequence split for a split of the heads by
all-to-all (so the scan of CP rank ``c`` runs over the whole sequence for head slice ``c``; chunks of 4
over the 16 positions, so the state passes between chunks that came from different CP ranks). The
pipeline case runs two stages through the 1F1B executor. Tolerance: rtol 1e-5, atol 1e-6 on fp32,
as the dense parity tests: the layouts only reorder sums.
"""

import pytest
import torch
import torch.distributed as dist

import cp_ring
import pstate
from tp_layers import allreduce_sequence_parallel_grads
from trainer.model import ModelGroups, build_chunks, lm_loss, model_shards, preset
from trainer.model.shards import assemble

SEED, BATCH, SEQ, VOCAB = 7, 4, 16, 97


def data():
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def run_model(parallel: dict, sp: bool = False):
    cfg = preset("tiny-hybrid").with_overrides(vocab_size=VOCAB, init_std=0.1, mamba_chunk=4)
    with pstate.initialize(pstate.ParallelConfig(**parallel)) as ps:
        groups = ModelGroups.from_state(ps, sequence_parallel=sp)
        (chunk,) = build_chunks(cfg, groups, pp_rank=0, pp=1, seed=SEED)
        ids, labels = data()
        if ps.cp.size > 1:
            ids, labels = (cp_ring.shard_sequence(t, group=ps.cp, dim=1) for t in (ids, labels))
        loss = lm_loss(chunk(ids), labels, cfg=cfg, groups=groups)
        loss.backward()
        allreduce_sequence_parallel_grads(chunk, group=ps.tp)
        for p in chunk.parameters():
            p.grad /= ps.dp_cp.size
            dist.all_reduce(p.grad, group=ps.dp_cp.group)
        dist.all_reduce(loss.detach(), group=ps.dp_cp.group)
        return loss.item() / ps.dp_cp.size, model_shards([chunk], grads=True)


CASES = {
    "tp2": (dict(tp=2), 2, {}),
    "tp2-sp": (dict(tp=2), 2, dict(sp=True)),
    "cp2": (dict(cp=2), 2, {}),
    "tp2-cp2-sp": (dict(tp=2, cp=2), 4, dict(sp=True)),
}


@pytest.mark.parametrize("case", CASES)
def test_hybrid_gradients_equal_the_one_process_model(run_ranks, case):
    parallel, world, options = CASES[case]
    ((ref_loss, ref),) = run_ranks(1, run_model, {})
    assert any(".mamba.conv.B.weight" in key for key in ref)
    results = run_ranks(world, run_model, parallel, **options)
    for loss, _ in results:
        assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert set(results[0][1]) == set(ref)
    for key, full in ref.items():
        assert full.data.abs().max() > 0, key  # every parameter takes part
        got = assemble([shards[key] for _, shards in results if key in shards])
        torch.testing.assert_close(got, full.data, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{case} {key}: {m}")

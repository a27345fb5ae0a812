"""The GPT model split over TP, SP, CP (ring, Ulysses and hierarchical), DP and EP against the one-process model.

Each layout builds the model from the same seed, runs one forward and backward on its part of a fixed
batch and reduces gradients as the training loop does (dense: mean over ``dp_cp``; experts: divided by
the dense DP size and summed over ``edp``; SP-replicated parameters: summed over TP). Every gradient piece
(and the loss) must equal the one-process model's. Tolerance: rtol 1e-5, atol 1e-6 on fp32; TP, CP and
DP only reorder sums (partial matmuls, the online softmax of ring attention, all-reduces), which moves
the last few bits; a wrong split or a missing reduction is off by O(1).
"""

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

import cp_ring
import pstate
from pstate.tags import is_expert_parallel
from tp_layers import allreduce_sequence_parallel_grads
from trainer.model import ModelGroups, build_chunks, lm_loss, model_shards, preset
from trainer.model.shards import assemble

SEED, BATCH, SEQ, VOCAB = 7, 4, 16, 97


def config(name: str, **changes):
    return replace(preset(name), vocab_size=VOCAB, **changes)


def data():
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def run_model(model_name: str, changes: dict, parallel: dict, sp: bool = False, **cp_options):
    cfg = config(model_name, **changes)
    with pstate.initialize(pstate.ParallelConfig(**parallel)) as ps:
        groups = ModelGroups.from_state(ps, sequence_parallel=sp, **cp_options)
        (chunk,) = build_chunks(cfg, groups, pp_rank=0, pp=1, seed=SEED)
        ids, labels = data()
        ids, labels = ids.chunk(ps.dp.size)[ps.dp.rank], labels.chunk(ps.dp.size)[ps.dp.rank]
        if ps.cp.size > 1:
            ids, labels = (cp_ring.shard_sequence(t, group=ps.cp, dim=1) for t in (ids, labels))
        loss = lm_loss(chunk(ids), labels, cfg=cfg, groups=groups)
        loss.backward()
        allreduce_sequence_parallel_grads(chunk, group=ps.tp)
        for p in chunk.parameters():
            if is_expert_parallel(p):
                p.grad /= ps.dp.size
                dist.all_reduce(p.grad, group=ps.edp.group)
            else:
                p.grad /= ps.dp_cp.size
                dist.all_reduce(p.grad, group=ps.dp_cp.group)
        dist.all_reduce(loss.detach(), group=ps.dp_cp.group)
        return (loss.item() / ps.dp_cp.size, model_shards([chunk], grads=True))


CASES = {
    "tp2": ("tiny", {}, dict(tp=2), 2, {}),
    "tp2-sp": ("tiny", {}, dict(tp=2), 2, dict(sp=True)),
    "tp2-gpt2-tied": ("tiny-gpt2", {}, dict(tp=2), 2, dict(sp=True)),
    "cp2-ring": ("tiny", {}, dict(cp=2), 2, {}),
    "cp2-ring-math": ("tiny", {}, dict(cp=2), 2, dict(cp_kernel="math")),
    "cp2-ulysses": ("tiny", {}, dict(cp=2), 2, dict(cp_attention="ulysses")),
    "cp4-hierarchical-2x2": ("tiny", {}, dict(cp=4, cp_a2a=2), 4, dict(cp_attention="hierarchical")),
    "cp4-hierarchical-2x2-math": (
        "tiny",
        {},
        dict(cp=4, cp_a2a=2),
        4,
        dict(cp_attention="hierarchical", cp_kernel="math"),
    ),
    "gpt2-cp2": ("tiny-gpt2", {}, dict(cp=2), 2, {}),
    "tp2-cp2-sp": ("tiny", {}, dict(tp=2, cp=2), 4, dict(sp=True)),
    "tp2-dp2-sp": ("tiny", {}, dict(tp=2), 4, dict(sp=True)),
    "ep2-dp2": ("tiny-moe", dict(moe_aux_loss_coeff=0.0), dict(ep=2), 2, {}),
    "ep2-tp2-sp": ("tiny-moe", dict(moe_aux_loss_coeff=0.0), dict(tp=2, ep=2), 4, dict(sp=True)),
    # multi-latent attention: replicated down-projections, heads split; v_head_dim != qk width (CP pads)
    "mla-tp2-sp": ("tiny-mla", {}, dict(tp=2), 2, dict(sp=True)),
    "mla-tp2-direct-q": ("tiny-mla", dict(q_lora_rank=None, rope_interleave=True), dict(tp=2), 2, {}),
    "mla-cp2-ring": ("tiny-mla", {}, dict(cp=2), 2, {}),
    "mla-cp2-ulysses": ("tiny-mla", {}, dict(cp=2), 2, dict(cp_attention="ulysses")),
    "mla-cp4-hierarchical-2x2": ("tiny-mla", {}, dict(cp=4, cp_a2a=2), 4, dict(cp_attention="hierarchical")),
    "mla-tp2-cp2-sp": ("tiny-mla", dict(q_lora_rank=None, v_head_dim=20), dict(tp=2, cp=2), 4, dict(sp=True)),
}


@pytest.mark.parametrize("case", CASES)
def test_gradients_equal_the_one_process_model(run_ranks, case):
    name, changes, parallel, world, options = CASES[case]
    ((ref_loss, ref),) = run_ranks(1, run_model, name, changes, {})
    results = run_ranks(world, run_model, name, changes, parallel, **options)
    for loss, _ in results:
        assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert set(results[0][1]) == set(ref)
    for key, full in ref.items():
        got = assemble([shards[key] for _, shards in results if key in shards])
        torch.testing.assert_close(got, full.data, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{case} {key}: {m}")

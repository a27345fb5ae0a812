"""The GPT model split into pipeline stages (1F1B, interleaved, zero-bubble, ZB-V, DualPipe-V, with TP/SP/DP)
against one process.

Each layout runs one step of ``MICRO`` micro-batches through the pipeline executor, completes the
gradients the split leaves partial (SP over TP, tied embeddings over the embedding group), averages over
``dp_cp`` and returns its gradient pieces; they must equal the one-process model's gradients of the mean
micro-batch loss. Tolerance as in test_model_parity (rtol 1e-5, atol 1e-6, fp32; only summation order
changes).
"""

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

import pstate
from trainer.model import ModelGroups, build_chunks, model_shards, preset
from trainer.model.shards import assemble
from trainer.train import local_batch, make_executor, sync_model_parallel_grads
from trainer.train.pipeline import stage_layout

SEED, BATCH, SEQ, VOCAB, MICRO = 7, 8, 16, 97, 4


def data():
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def run_pipeline(
    model_name: str, parallel: dict, schedule: str, sp: bool = False, layers: int | None = None, uneven=None
):
    cfg = replace(preset(model_name), vocab_size=VOCAB)
    cfg = cfg if layers is None else replace(cfg, layers=layers)
    with pstate.initialize(pstate.ParallelConfig(**parallel)) as ps:
        groups = ModelGroups.from_state(ps, sequence_parallel=sp)
        chunks = build_chunks(
            cfg,
            groups,
            pp_rank=ps.pp.rank,
            pp=ps.pp.size,
            vpp=parallel.get("vpp", 1),
            seed=SEED,
            layout=stage_layout(schedule, ps.pp.size),
            uneven=uneven,
        )
        executor = make_executor(chunks, ps, cfg, groups, schedule=schedule, microbatches=MICRO)
        ids, labels = (t.chunk(ps.dp.size)[ps.dp.rank] for t in data())
        micro = [local_batch(i, lab, ps) for i, lab in zip(ids.chunk(MICRO), labels.chunk(MICRO))]
        result = executor.step([i for i, _ in micro], [lab for _, lab in micro])
        sync_model_parallel_grads(chunks, ps, sequence_parallel=sp)
        for chunk in chunks:
            for p in chunk.parameters():
                p.grad /= ps.dp_cp.size
                dist.all_reduce(p.grad, group=ps.dp_cp.group)
        loss = torch.stack(result.losses).mean().item() if result.losses else None
        return loss, model_shards(chunks, grads=True)


CASES = {
    "pp1": ("tiny", dict(), "1f1b", {}),
    "pp2-1f1b": ("tiny", dict(pp=2), "1f1b", {}),
    "pp2-gpt2-tied": ("tiny-gpt2", dict(pp=2), "1f1b", {}),
    "pp2-vpp2-interleaved": ("tiny-gpt2", dict(pp=2, vpp=2), "interleaved-1f1b", {}),
    "pp2-zero-bubble": ("tiny", dict(pp=2), "zero-bubble", {}),
    "pp4-gpipe": ("tiny", dict(pp=4), "gpipe", {}),
    "tp2-sp-pp2-dp2": ("tiny-gpt2", dict(tp=2, pp=2), "1f1b", dict(sp=True)),
    "mla-pp2-1f1b": ("tiny-mla", dict(pp=2), "1f1b", {}),
    # V layouts: the tied embedding's two copies both on rank 0 (summed there)
    "pp2-zb-v-tied": ("tiny-gpt2", dict(pp=2, vpp=2), "zb-v", {}),
    "pp4-dualpipe-v": ("tiny", dict(pp=4, vpp=2), "dualpipe-v", dict(layers=8)),
    "tp2-sp-pp2-dp2-dualpipe-v-tied": ("tiny-gpt2", dict(tp=2, pp=2, vpp=2), "dualpipe-v", dict(sp=True)),
}
# uneven layouts (parallel.pipeline_layout), with stages that hold no transformer layer
CASES |= {
    "pp2-uneven-3-1-tied": ("tiny-gpt2", dict(pp=2), "1f1b", dict(uneven=[3, 1])),
    "pp4-uneven-empty-last": ("tiny", dict(pp=4), "zero-bubble", dict(uneven=[2, 1, 1, 0])),
    "pp2-zb-v-uneven-empty-first": ("tiny", dict(pp=2, vpp=2), "zb-v", dict(uneven=[0, 2, 1, 1])),
}
# a hybrid model (Mamba, attention, Mamba, MLP): stage 0 holds M*, stage 1 M-
CASES |= {
    "pp2-hybrid-1f1b": ("tiny-hybrid", dict(pp=2), "1f1b", {}),
    "pp2-hybrid-zero-bubble": ("tiny-hybrid", dict(pp=2), "zero-bubble", {}),
    "tp2-sp-cp2-pp2-hybrid": ("tiny-hybrid", dict(tp=2, cp=2, pp=2), "1f1b", dict(sp=True)),
}
WORLD = {"tp2-sp-cp2-pp2-hybrid": 8, "tp2-sp-pp2-dp2": 8, "tp2-sp-pp2-dp2-dualpipe-v-tied": 8}


@pytest.mark.parametrize("case", CASES)
def test_pipeline_gradients_equal_the_one_process_model(run_ranks, case):
    name, parallel, schedule, options = CASES[case]
    world = WORLD.get(case, parallel.get("pp", 1))
    ((ref_loss, ref),) = run_ranks(1, run_pipeline, name, {}, "1f1b", layers=options.get("layers"))
    results = run_ranks(world, run_pipeline, name, parallel, schedule, **options)
    losses = [loss for loss, _ in results if loss is not None]
    assert sum(losses) / len(losses) == pytest.approx(ref_loss, rel=1e-5)  # last-stage ranks: mean over DP
    assert set().union(*(shards for _, shards in results)) == set(ref)
    for key, full in ref.items():
        got = assemble([shards[key] for _, shards in results if key in shards])
        torch.testing.assert_close(got, full.data, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{case} {key}: {m}")

"""Multi-token prediction (DeepSeek-V3's MTP): the loss against a hand-written computation on one process,
the seeded initialisation and checkpoint names of its tensors, and the rules refused before launch."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import pstate
from trainer.config import check_run, load_run_config
from trainer.errors import TrainerError
from trainer.model import ModelGroups, build_chunks, model_shards, preset
from trainer.model.mtp import mtp_loss
from trainer.train.flops import flops_per_token

SEED, BATCH, SEQ, VOCAB, DEPTH = 3, 2, 12, 53, 2


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def reference_mtp_loss(chunk, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Depth k at position t: [enorm(Emb(token t+k)); hnorm(h)] -> proj -> block -> final norm -> head,
    cross entropy against token t+k+1, over the positions t + k + 1 <= seq that have one."""
    eps = chunk.cfg.norm_eps
    table = chunk.embedding.weight[:VOCAB]
    head = table if chunk.head is None else chunk.head.weight[:VOCAB]
    h, losses = hidden, []  # [seq, batch, hidden]
    for k, module in enumerate(chunk.mtp, start=1):
        ids = torch.zeros(BATCH, SEQ, dtype=torch.long)
        ids[:, : SEQ + 1 - k] = tokens[:, k:]  # token t+k (tokens has seq + 1 columns); the rest: padding
        e = F.embedding(ids.t(), table)
        x = torch.cat([rms(e, module.enorm.weight, eps), rms(h, module.hnorm.weight, eps)], dim=-1)
        h = module.block(x @ module.proj.weight.t())
        logits = rms(h, chunk.final_norm.weight, eps) @ head.t()  # [seq, batch, vocab]
        valid = SEQ - k
        target = tokens[:, k + 1 : k + 1 + valid].t()  # token t+k+1
        losses.append(F.cross_entropy(logits[:valid].reshape(-1, VOCAB), target.reshape(-1)))
    return torch.stack(losses).mean()


def one_process_model(name: str, **changes):
    cfg = replace(preset(name), vocab_size=VOCAB, mtp_depth=DEPTH, **changes)
    ps = pstate.initialize(pstate.ParallelConfig())
    (chunk,) = build_chunks(cfg, ModelGroups.from_state(ps), pp_rank=0, pp=1, seed=SEED)
    return ps, chunk


def mtp_loss_matches_reference(tied: bool):
    ps, chunk = one_process_model("tiny", tied_embeddings=tied)
    try:
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(5))
        logits, hidden = chunk(tokens[:, :-1])
        got = mtp_loss(chunk, hidden, tokens[:, 1:])
        want = reference_mtp_loss(chunk, hidden, tokens)
        params = [m.proj.weight for m in chunk.mtp] + [chunk.embedding.weight]
        grads = torch.autograd.grad(got, params, retain_graph=True)
        want_grads = torch.autograd.grad(want, params)
        return got.item(), want.item(), grads, want_grads, logits.shape
    finally:
        ps.destroy()


@pytest.mark.parametrize("tied", [False, True])
def test_mtp_loss_equals_a_hand_written_reference(run_ranks, tied):
    ((got, want, grads, want_grads, shape),) = run_ranks(1, mtp_loss_matches_reference, tied)
    assert shape[:2] == (SEQ, BATCH)
    assert got == pytest.approx(want, rel=1e-6)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def initial_mtp_tensors():
    ps, chunk = one_process_model("tiny")
    try:
        return {k: s.data.clone() for k, s in model_shards([chunk]).items()}
    finally:
        ps.destroy()


def test_mtp_tensors_are_named_and_seeded_as_their_own_layers(run_ranks):
    (shards,) = run_ranks(1, initial_mtp_tensors)
    layers = preset("tiny").layers
    for k in range(DEPTH):
        for name in ("enorm.weight", "hnorm.weight", "proj.weight", "block.attn.q.weight", "block.mlp.fc2.weight"):
            assert f"mtp.{k}.{name}" in shards
        assert shards[f"mtp.{k}.proj.weight"].shape == (64, 128)
        assert shards[f"mtp.{k}.proj.weight"].std() > 0
        assert torch.equal(shards[f"mtp.{k}.enorm.weight"], torch.ones(64))
    # a block's tensors are drawn from their own seeds, not a main layer's or the other depth's
    blocks = [shards[f"layers.{i}.attn.q.weight"] for i in range(layers)]
    blocks += [shards[f"mtp.{k}.block.attn.q.weight"] for k in range(DEPTH)]
    for i, a in enumerate(blocks):
        assert all(not torch.equal(a, b) for b in blocks[i + 1 :])


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"mtp_depth": -1}, r"model.mtp_depth=-1: must be an integer >= 0"),
        ({"mtp_depth": 1, "mtp_loss_weight": -0.5}, r"model.mtp_loss_weight=-0.5: must be >= 0"),
    ],
)
def test_bad_mtp_fields_are_refused(changes, match):
    with pytest.raises(TrainerError, match=match):
        replace(preset("tiny"), **changes)


@pytest.mark.parametrize(
    "overrides, world, match",
    [
        ({"parallel": {"cp": 2}}, 2, r"model.mtp_depth=1 with cp=2 is not supported: the tokens t\+k"),
        ({"data": {"packing": "pack"}}, 1, r"with data.packing='pack' is not supported"),
        ({"parallel": {"pp": 2}}, 2, r"with pp=2 needs model.tied_embeddings=true"),
        ({"train": {"zero": 3}}, 2, r"with --zero 3 is not supported yet"),
        ({"train": {"seq_len": 1}}, 1, r"model.mtp_depth=1 must be below seq_len=1"),
    ],
)
def test_mtp_combinations_it_does_not_support_are_refused(overrides, world, match):
    overrides = {**overrides, "model": {"preset": "tiny", "mtp_depth": 1}}
    with pytest.raises(TrainerError, match=match):
        check_run(load_run_config(overrides=overrides), world)


def test_untied_last_stage_without_an_embedding_refuses_mtp(run_ranks):
    with pytest.raises(Exception, match="only tied embeddings"):
        run_ranks(2, build_untied_pipeline)


def build_untied_pipeline():
    cfg = replace(preset("tiny"), vocab_size=VOCAB, mtp_depth=1)
    with pstate.initialize(pstate.ParallelConfig(pp=2)) as ps:
        build_chunks(cfg, ModelGroups.from_state(ps), pp_rank=ps.pp.rank, pp=2, seed=SEED)


def counted_flops_with_mtp() -> tuple[float, float]:
    """PyTorch's FLOP counter over one forward and MTP loss of ``SEQ`` tokens (times 3, per token), and
    ``flops_per_token``'s count."""
    cfg = replace(preset("tiny-mla"), vocab_size=VOCAB, mtp_depth=DEPTH)
    with pstate.initialize(pstate.ParallelConfig()) as ps, torch.no_grad():
        (chunk,) = build_chunks(cfg, ModelGroups.from_state(ps), pp_rank=0, pp=1, seed=0)
        ids = torch.zeros(BATCH, SEQ, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            _, hidden = chunk(ids)
            mtp_loss(chunk, hidden, ids)
    return 3 * counter.get_total_flops() / (BATCH * SEQ), flops_per_token(cfg, SEQ)


def test_flops_per_token_count_the_mtp_modules(run_ranks):
    ((counted, ours),) = run_ranks(1, counted_flops_with_mtp)
    assert ours == counted

"""``ShardedOptimizer(aligned=...)`` with a tensor tied across two pipeline stages, against one process.

World 4 = 2 stages x DP 2. The one-process model has a tied weight ``E`` and one weight per stage; its
loss is ``f0(E, W0) + f1(E, W1, b1)``. Stage ``s`` holds ``W_s`` (and ``b1``) and its own copy of ``E``;
each stage computes its term, so each copy's gradient is a part of ``E``'s. The parameters of the two
stages differ, and buckets are tiny, so ``E`` would sit at other offsets of each stage's buckets; with
``aligned=[E]`` both stages own the same elements of it, and summing :meth:`grad_shard` over the pair of
ranks that hold the copies gives ``E``'s gradient. After the steps both copies equal ``E`` of AdamW in
one process on all ranks' batches. Tolerance: ``torch.testing``'s float32 default, as in
``test_sharded_optimizer.py`` (only the order of sums changes).
"""

import pytest
import torch
import torch.distributed as dist

from dp_shard import ShardedOptimizer
from pstate.tags import mark_tied_copy

SEED, STEPS, BUCKET_MB = 7, 3, 1e-4


def weights():
    g = torch.Generator().manual_seed(SEED)
    return {
        "E": torch.randn(7, 5, generator=g),
        "W0": torch.randn(3, 5, generator=g),
        "W1": torch.randn(6, 5, generator=g),
        "b1": torch.randn(6, generator=g),
    }


def terms(p, x):
    f0 = (x @ p["E"].t()).tanh().sum(1).pow(2).mean() + (x @ p["W0"].t()).pow(2).mean()
    f1 = ((x @ p["W1"].t() + p["b1"]).tanh() @ p["E"][:6]).pow(2).mean()
    return f0, f1


def batch(rank, step):
    return torch.randn(4, 5, generator=torch.Generator().manual_seed(100 * step + rank))


def reference():
    params = {k: torch.nn.Parameter(v) for k, v in weights().items()}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-2)
    for step in range(STEPS):
        loss = sum(sum(terms(params, batch(r, step))) for r in range(2)) / 2
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach() for k, v in params.items()}


def train(aligned: bool):
    rank = dist.get_rank()
    stage, dp_rank = divmod(rank, 2)
    dp = [dist.new_group([0, 1]), dist.new_group([2, 3])][stage]
    tie = [dist.new_group([0, 2]), dist.new_group([1, 3])][dp_rank]
    full = weights()
    names = ["E", "W0"] if stage == 0 else ["W1", "b1", "E"]
    params = {k: torch.nn.Parameter(full[k].clone()) for k in names}
    if stage == 1:
        mark_tied_copy(params["E"])
    optimizer = ShardedOptimizer(
        list(params.items()),
        torch.optim.AdamW,
        group=dp,
        stage=2,
        bucket_size_mb=BUCKET_MB,
        aligned=[params["E"]] if aligned else (),
        lr=1e-2,
    )
    owned = optimizer.grads.owned(params["E"])
    span = None if owned is None else (owned.start, owned.stop)
    for step in range(STEPS if aligned else 0):  # unaligned shards differ in size: summing them would abort
        both = terms({**full, **params}, batch(dp_rank, step))
        both[stage].backward()
        shard = optimizer.grad_shard(params["E"])
        if shard is not None:
            dist.all_reduce(shard, group=tie)
        optimizer.step()
        optimizer.zero_grad()
    return span, {k: v.detach().clone() for k, v in params.items()}


def test_tied_copies_own_matching_pieces_and_train_as_one_tensor(run_ranks):
    want = reference()
    results = run_ranks(4, train, True)
    for rank, (span, params) in enumerate(results):
        assert span == results[rank % 2][0]  # the same elements of E on both stages
        for name, value in params.items():
            torch.testing.assert_close(value, want[name])


def test_without_alignment_the_stages_own_other_pieces(run_ranks):
    spans = [span for span, _ in run_ranks(4, train, False)]
    assert spans[:2] != spans[2:]  # so summing their shards would add unrelated elements


def test_aligned_parameters_must_be_the_optimizer_s():
    param, stranger = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(Exception, match="aligned"):
        ShardedOptimizer([param], torch.optim.AdamW, group=None, aligned=[stranger])

"""HSDP (shard within a group, replicate across groups) and experts sharded over their own group, against
one process.

World 4. Dense parameters are sharded over ``SHARD`` ({0, 1}, {2, 3}) and replicated over ``REPLICATE``
({0, 2}, {1, 3}) (HSDP 2x2), or over the whole world (ZeRO-3). Each block also holds one "expert": EP
rank ``r % 2`` keeps expert ``r % 2`` of the two the one-process model holds (the same weights: both are
drawn from one seed), and runs its own tokens through it; expert parameters are sharded over the ranks
holding the same expert ({0, 2}, {1, 3}: the expert-data-parallel group). The reference trains the one
model on all ranks' batches, rank r's tokens through expert r % 2, with the mean of the ranks' losses;
AdamW with two parameter groups; two micro-batches per step, the first under ``no_sync``.

Checked: every rank's pieces (parameters after ``STEPS`` steps and the last step's gradients),
assembled over the rank's shard group (dense) or expert group (experts), equal the reference's, and
replicas hold identical pieces. Tolerance: ``torch.testing``'s float32 default (rtol 1.3e-6, atol 1e-5):
only the order in which the reductions add the ranks' gradients differs. And the collectives of one
step: each flat shard reduce-scattered once and (HSDP) all-reduced once across replicas, whatever the
micro-batch count; payload bytes equal the analytic formula.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dp_shard import clip_grad_norm_
from dp_shard.fully_shard import fully_shard, parameter_shards, sharded_state
from pstate import tags
from pstate.comm import CommRecorder

SEED, BATCH, HIDDEN, LAYERS, STEPS, MICRO, WORLD = 11, 4, 8, 2, 3, 2, 4
SHARD, REPLICATE, EXPERT = [[0, 1], [2, 3]], [[0, 2], [1, 3]], [[0, 2], [1, 3]]


class Block(nn.Module):
    """A residual layer with a dense part and one expert: ``ep_rank=None`` holds both experts (the
    one-process model), else only that one (tagged expert_parallel, under one name on every rank)."""

    def __init__(self, ep_rank: int | None) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        experts = [nn.Linear(HIDDEN, HIDDEN) for _ in range(2)]
        if ep_rank is None:
            self.experts = nn.ModuleList(experts)
        else:
            self.expert = experts[ep_rank]
            for p in self.expert.parameters():
                tags.mark_expert_parallel(p)

    def forward(self, h: torch.Tensor, which: int) -> torch.Tensor:
        h = h + torch.tanh(self.fc(self.norm(h)))
        expert = self.expert if hasattr(self, "expert") else self.experts[which]
        return h + torch.tanh(expert(h))


class Net(nn.Module):
    def __init__(self, ep_rank: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(SEED)
        self.embed = nn.Linear(HIDDEN, HIDDEN)
        self.blocks = nn.ModuleList(Block(ep_rank) for _ in range(LAYERS))
        self.head = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor, which: int) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, which)
        return self.head(h)


def batch(rank: int, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    return torch.randn(BATCH, HIDDEN, generator=g), torch.randn(BATCH, HIDDEN, generator=g)


def optimizer_for(named: dict[str, nn.Parameter]) -> torch.optim.Optimizer:
    decay = [p for n, p in named.items() if n.endswith("weight") and "norm" not in n]
    rest = [p for n, p in named.items() if not (n.endswith("weight") and "norm" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "lr": 3e-3}], lr=1e-2)


def reference() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model = Net()
    optimizer = optimizer_for(dict(model.named_parameters()))
    for step in range(STEPS):
        for m in range(MICRO):
            loss = sum(F.mse_loss(model(*_input(r, step, m)), batch(r, step, m)[1]) for r in range(WORLD))
            (loss / WORLD).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    return {n: p.detach() for n, p in model.named_parameters()}, grads


def _input(rank: int, step: int, micro: int) -> tuple[torch.Tensor, int]:
    return batch(rank, step, micro)[0], rank % 2


def _groups(ranks: list[list[int]]) -> dist.ProcessGroup:
    """Every rank creates every group (collective), returns the one holding it."""
    mine = None
    for members in ranks:
        group = dist.new_group(members)
        if dist.get_rank() in members:
            mine = group
    return mine


def train(hsdp: bool, experts: bool, record: bool = False):
    rank = dist.get_rank()
    shard, replicate = (_groups(SHARD), _groups(REPLICATE)) if hsdp else (dist.group.WORLD, None)
    expert_group = _groups(EXPERT)
    model = Net(rank % 2 if experts else None)
    fully_shard(model, group=shard, replicate_group=replicate, expert_group=expert_group, units=Block)
    state = sharded_state(model)
    optimizer = optimizer_for(dict(model.named_parameters()))
    recorder = CommRecorder({shard: "shard", expert_group: "edp"} | ({replicate: "replicate"} if hsdp else {}))
    for step in range(STEPS):
        recorder.clear()
        with recorder if record and step == STEPS - 1 else _nothing():
            for m in range(MICRO):
                x, y = batch(rank, step, m)
                if m < MICRO - 1:
                    with state.no_sync():
                        F.mse_loss(model(x, rank % 2), y).backward()
                else:
                    F.mse_loss(model(x, rank % 2), y).backward()
            state.finish_grad_sync()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    ranges = {n: s.flat_range for n, s in parameter_shards(model).items()}
    records = [(r.axis, r.op, r.bytes) for r in recorder.records]
    flats = [(u.padded, u.group is expert_group) for u in state.units]
    return params, grads, ranges, records, flats


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _full(results, rank: int, name: str, which: int, members: list[int]) -> torch.Tensor:
    """The parameter (``which=0``) or gradient (1) assembled from the pieces of ``members`` in rank order."""
    return torch.cat([results[m][which][name] for m in members])


@pytest.mark.parametrize(
    ("hsdp", "experts"), [(True, False), (False, True), (True, True)], ids=["hsdp", "ep", "hsdp-ep"]
)
def test_pieces_equal_the_one_process_run(run_ranks, hsdp, experts):
    results = run_ranks(WORLD, train, hsdp, experts)
    params, grads = reference()
    for rank, (mine, _, ranges, _, _) in enumerate(results):
        for name in mine:
            expert = ".expert." in name
            ref_name = name.replace(".expert.", f".experts.{rank % 2}.") if expert else name
            if expert:
                members = next(g for g in EXPERT if rank in g)
            else:
                members = next(g for g in SHARD if rank in g) if hsdp else list(range(WORLD))
            for which, expected in ((0, params), (1, grads)):
                full = _full(results, rank, name, which, members).view(expected[ref_name].shape)
                torch.testing.assert_close(full, expected[ref_name], msg=lambda m, n=name, r=rank: f"rank {r} {n}: {m}")
            if hsdp and not expert:  # replicas hold the same elements with the same values
                other = next(g for g in REPLICATE if rank in g)
                for r in other:
                    assert results[r][2][name] == ranges[name]
                    assert torch.equal(results[r][0][name], mine[name])


def test_hsdp_reduces_each_element_once_per_step_and_gathers_within_the_shard_group(run_ranks):
    """Payload bytes of the last step (``MICRO`` micro-batches): per flat shard of ``padded`` fp32
    elements, an all-gather of it for each forward and backward, one reduce-scatter of it within the
    shard group and one all-reduce of its half across the replicas; experts the same over edp, without
    the all-reduce."""
    for _, _, _, records, flats in run_ranks(WORLD, train, True, True, True):
        expected: dict[tuple[str, str], int] = {}
        for padded, expert in flats:
            axis = "edp" if expert else "shard"
            for op, nbytes in (("all_gather", 2 * MICRO * 4 * padded), ("reduce_scatter", 4 * padded)):
                expected[(axis, op)] = expected.get((axis, op), 0) + nbytes
            if not expert:
                expected[("replicate", "all_reduce")] = expected.get(("replicate", "all_reduce"), 0) + 4 * padded // 2
        got: dict[tuple[str, str], int] = {}
        for axis, op, nbytes in records:
            got[(axis, op)] = got.get((axis, op), 0) + nbytes
        assert got == expected
        reductions = [r for r in records if r[1] in ("reduce_scatter", "all_reduce")]
        assert len(reductions) == len(flats) + sum(not e for _, e in flats)  # once per step


def hsdp_norm() -> tuple[float, float]:
    shard, replicate = _groups(SHARD), _groups(REPLICATE)
    expert_group = _groups(EXPERT)
    rank = dist.get_rank()
    model = fully_shard(Net(rank % 2), group=shard, replicate_group=replicate, expert_group=expert_group, units=Block)
    x, y = batch(rank, 0, 0)
    F.mse_loss(model(x, rank % 2), y).backward()
    ep = _groups([[0, 1], [2, 3]])  # the ranks holding the other expert
    norm = clip_grad_norm_(model.parameters(), 1e9, ep_group=ep, dense_groups=[shard], expert_groups=[expert_group])
    return float(norm)


def test_clipping_counts_each_element_once_over_the_shard_and_expert_groups(run_ranks):
    model = Net()
    loss = sum(F.mse_loss(model(*_input(r, 0, 0)), batch(r, 0, 0)[1]) for r in range(WORLD)) / WORLD
    loss.backward()
    expected = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9))
    for norm in run_ranks(WORLD, hsdp_norm):
        assert norm == pytest.approx(expected, rel=1e-5)

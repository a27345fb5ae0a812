"""``fully_shard`` (ZeRO-3) against a single-process model trained on the whole batch.

Every rank builds the model after ``torch.manual_seed(SEED)``, shards it with one unit per ``Block``
(the root keeps the embedding and the head) and trains ``STEPS`` steps of AdamW with two parameter
groups (weights decayed at one learning rate; biases and norms not decayed, at another) on its own
batches. The reference in this process trains the same model on all ranks' batches with the loss the
mean of the ranks' losses, which is what the averaged reduce-scatter computes. Gradients are zeroed
with ``set_to_none=False`` on both sides, so a parameter unused in a step has a zero gradient in both
(inside a unit that ran, FSDP's gradient is zero there, as documented) and AdamW updates it the same.

Full parameters are rebuilt by concatenating the ranks' pieces in rank order (each rank holds the
next contiguous range of every flattened parameter), independently of the checkpoint descriptors.

Tolerance: ``torch.testing``'s float32 default (rtol 1.3e-6, atol 1e-5). The computation is the same
up to the order in which the reduce-scatter adds the ranks' gradients, which changes only the last
bits; AdamW's normalised update does not amplify them over a few steps.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dp_shard import clip_grad_norm_
from dp_shard.fully_shard import fully_shard
from pstate import tags

SEED, BATCH, IN, HIDDEN, LAYERS, STEPS = 1234, 4, 6, 12, 3, 3


class Block(nn.Module):
    """A residual layer; ``extra`` runs only when ``use_extra``."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        self.fc = nn.Linear(HIDDEN, HIDDEN)
        self.extra = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, h: torch.Tensor, use_extra: bool = True) -> torch.Tensor:
        h = h + torch.tanh(self.fc(self.norm(h)))
        return h + torch.tanh(self.extra(h)) if use_extra else h


class Net(nn.Module):
    """Embedding, ``LAYERS`` blocks and a head; ``tied`` shares the head's weight with block 1's ``fc``."""

    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(IN, HIDDEN)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.head = nn.Linear(HIDDEN, HIDDEN)
        if tied:
            self.head.weight = self.blocks[1].fc.weight

    def forward(self, x: torch.Tensor, use_extra: bool = True) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, use_extra=use_extra)
        return self.head(h)


def batch(rank: int, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    return torch.randn(BATCH, IN, generator=generator), torch.randn(BATCH, HIDDEN, generator=generator)


def uses_extra(rank: int, step: int, unused: bool) -> bool:
    """With ``unused``: no rank runs the blocks' ``extra`` in step 1, only rank 0 does in step 2."""
    return not unused or step == 0 or (step == 2 and rank == 0)


def optimizer_for(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW with a decayed group (weights of linear layers) and an undecayed one (biases, norms)."""
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight") and "norm" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "lr": 3e-3}], lr=1e-2)


def reference(world: int, *, micro: int = 1, unused: bool = False, tied: bool = False):
    """The single-process parameters after ``STEPS`` steps and the gradients of the last step."""
    torch.manual_seed(SEED)
    model = Net(tied)
    optimizer = optimizer_for(model)
    for step in range(STEPS):
        for m in range(micro):
            loss = 0.0
            for r in range(world):
                x, y = batch(r, step, m)
                loss = loss + F.mse_loss(model(x, uses_extra(r, step, unused)), y) / world
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    return {n: p.detach() for n, p in model.named_parameters()}, grads


UNITS = {
    "blocks": Block,
    "nested": lambda name, module: isinstance(module, (Block, nn.Linear)),  # Linears inside Blocks too
    "one": None,
}


def train_sharded(*, micro=1, unused=False, tied=False, prefetch=True, units="blocks"):
    """This rank's pieces of the parameters after training, and of the last step's gradients."""
    rank = dist.get_rank()
    torch.manual_seed(SEED)
    model = fully_shard(Net(tied), group=dist.group.WORLD, units=UNITS[units], prefetch=prefetch)
    optimizer = optimizer_for(model)
    for step in range(STEPS):
        for m in range(micro):
            x, y = batch(rank, step, m)
            F.mse_loss(model(x, uses_extra(rank, step, unused)), y).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, grads


def assemble(pieces: list[dict[str, torch.Tensor]], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full tensors: the ranks' pieces concatenated in rank order, shaped like the reference."""
    return {name: torch.cat([p[name] for p in pieces]).view(ref.shape) for name, ref in like.items()}


def check(results, world, **options):
    expected_params, expected_grads = reference(world, **options)
    params = assemble([r[0] for r in results], expected_params)
    grads = assemble([r[1] for r in results], expected_grads)
    assert set(params) == set(expected_params)
    for name in expected_params:
        torch.testing.assert_close(grads[name], expected_grads[name], msg=lambda m, n=name: f"grad {n}: {m}")
        torch.testing.assert_close(params[name], expected_params[name], msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dp", [2, 4])
def test_equals_single_process_adamw_with_weight_decay_groups(run_ranks, dp):
    check(run_ranks(dp, train_sharded), dp)


def test_without_prefetch(run_ranks):
    check(run_ranks(2, train_sharded, prefetch=False), 2)


def test_nested_units(run_ranks):
    """Here ``extra`` is a unit of its own, so it must run on all ranks or none (no ``unused``)."""
    check(run_ranks(2, train_sharded, units="nested", micro=2), 2, micro=2)


def test_the_whole_model_as_one_unit(run_ranks):
    check(run_ranks(2, train_sharded, units="one", unused=True, micro=2), 2, unused=True, micro=2)


@pytest.mark.parametrize("dp", [2, 4])
def test_gradient_accumulation_over_micro_batches(run_ranks, dp):
    check(run_ranks(dp, train_sharded, micro=2), dp, micro=2)


def test_parameters_unused_in_a_step(run_ranks):
    check(run_ranks(2, train_sharded, unused=True), 2, unused=True)


def test_tied_parameters_across_units(run_ranks):
    results = run_ranks(2, train_sharded, tied=True, micro=2)
    assert "head.weight" not in results[0][0]  # one parameter, under its first name
    check(results, 2, tied=True, micro=2)


def forward_outputs():
    """Outputs of the plain and the sharded model on the same input: with grad, without, and again."""
    torch.manual_seed(SEED)
    plain = Net()
    torch.manual_seed(SEED)
    sharded = fully_shard(Net(), group=dist.group.WORLD, units=Block)
    x = batch(dist.get_rank(), 0, 0)[0]
    with torch.no_grad():
        quiet = sharded(x)
    return plain(x).detach(), sharded(x).detach(), quiet, sharded(x).detach()


@pytest.mark.parametrize("dp", [2, 4])
def test_outputs_identical_to_the_plain_module(run_ranks, dp):
    for plain, *sharded in run_ranks(dp, forward_outputs):
        for output in sharded:
            assert torch.equal(output, plain)


def sharded_grad_norm(dp_group_in_norm: bool):
    torch.manual_seed(SEED)
    model = fully_shard(Net(), group=dist.group.WORLD, units=Block)
    x, y = batch(dist.get_rank(), 0, 0)
    F.mse_loss(model(x), y).backward()
    groups = [dist.group.WORLD] if dp_group_in_norm else []
    return clip_grad_norm_(model.parameters(), 1e9, model_parallel_groups=groups)


def test_clip_grad_norm_counts_each_shard_once(run_ranks):
    """The pieces are disjoint across ranks: the DP group is passed to ``clip_grad_norm_`` as a group
    whose ranks hold different elements, and the norm equals the single-process one."""
    torch.manual_seed(SEED)
    model = Net()
    sum(F.mse_loss(model(x), y) / 2 for x, y in (batch(r, 0, 0) for r in range(2))).backward()
    expected = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
    for norm in run_ranks(2, sharded_grad_norm, True):
        torch.testing.assert_close(norm, expected)
    assert all(norm < expected * 0.99 for norm in run_ranks(2, sharded_grad_norm, False))  # the local part only


def tags_of_the_pieces():
    torch.manual_seed(SEED)
    model = Net()
    block = model.blocks[0]
    tags.mark_tensor_parallel(block.fc.weight, 0)
    tags.mark_sequence_parallel(block.norm.weight)
    tags.mark_expert_parallel(block.extra.weight)
    tags.mark_tied_copy(block.extra.bias)
    fully_shard(model, group=dist.group.WORLD, units=Block, expert_group=dist.group.WORLD)
    pieces = dict(model.named_parameters())
    return {
        name: (
            tags.tensor_parallel_dim(p),
            tags.is_sequence_parallel(p),
            tags.is_expert_parallel(p),
            tags.is_tied_copy(p),
        )
        for name, p in pieces.items()
        if name.startswith("blocks.0.")
    }


def test_pieces_keep_the_parameters_tags(run_ranks):
    """Clipping and the model-parallel gradient completions read the tags on what the optimizer sees."""
    for found in run_ranks(2, tags_of_the_pieces):
        assert found["blocks.0.fc.weight"] == (0, False, False, False)
        assert found["blocks.0.norm.weight"] == (None, True, False, False)
        assert found["blocks.0.extra.weight"] == (None, False, True, False)
        assert found["blocks.0.extra.bias"] == (None, False, False, True)
        assert found["blocks.0.fc.bias"] == (None, False, False, False)

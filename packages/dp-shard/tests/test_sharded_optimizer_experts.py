"""``ShardedOptimizer(expert_group=...)``: dense and expert parameters, against single-process AdamW.

The model: ``out = (tanh(x W_in^T + b_in) + moe(x)) W_out^T``, where ``moe`` sends each token to one of
``EXPERTS`` experts (``tanh(x E_w[e]^T + E_b[e])``, chosen by the argmax of the token's first features).
Expert parallelism without a dispatcher: each rank holds ``EXPERTS / ep`` experts (tagged
``expert_parallel``, one ``[local experts, ...]`` tensor each, as ``moe_dispatch.GroupedExperts``), gathers
the tokens of its EP group, applies its experts to all of them, and an all-reduce over EP (summed again
in backward) gives every token the output of its expert. Groups come from ``pstate.initialize``: world 4
at EP=2 (dense DP=4, EDP=2), EP=4 (EDP=1) and EP=1 (EDP=4 = DP), and world 2 at EP=2.

The reference trains the full model in one process on the mean of every rank's loss, clipping at
``MAX_NORM`` (active in every step). Checked: every rank's reduced gradient shards after the first
backward (expert gradients are reduced over EDP but divided by the dense DP size: dividing by EDP scales
them by ``dp / edp``, which the gradients and the norms show; AdamW alone would hide it), the global
norms, the parameters after ``STEPS`` steps, the optimizer state held once over the world, a state
dict round trip, and a loss scaler's overflow found in one rank's expert shard. Tolerance:
``torch.testing``'s float32 default (sums in another order).
"""

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import pstate
from dp_shard import DataParallelError, LossScaler, ShardedOptimizer
from pstate import Shard
from pstate.tags import mark_expert_parallel

SEED, BATCH, IN, HIDDEN, OUT, EXPERTS, STEPS = 3, 6, 5, 8, 4, 4, 3
MAX_NORM, BUCKET_MB = 0.05, 1e-4  # ~26 floats per bucket: several buckets, shards cut through parameters
DENSE, EXPERT = ("w_in", "b_in", "w_out"), ("e_w", "e_b")


def weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    shapes = {"w_in": (HIDDEN, IN), "b_in": (HIDDEN,), "w_out": (OUT, HIDDEN)}
    shapes |= {"e_w": (EXPERTS, HIDDEN, IN), "e_b": (EXPERTS, HIDDEN)}
    return {k: torch.randn(*s, generator=g) * 0.5 for k, s in shapes.items()}


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(BATCH, IN, generator=g), torch.randn(BATCH, OUT, generator=g)


def experts_out(p, x, first):
    """The output of experts ``first, first + 1, ...`` (those in ``p``) for the tokens routed to them."""
    route = x[:, :EXPERTS].argmax(1)
    out = torch.zeros(x.size(0), HIDDEN)
    for i in range(p["e_w"].size(0)):
        mask = (route == first + i).unsqueeze(1)
        out = out + mask * torch.tanh(x @ p["e_w"][i].t() + p["e_b"][i])
    return out


def loss_of(p, x, y, moe):
    return F.mse_loss((torch.tanh(x @ p["w_in"].t() + p["b_in"]) + moe) @ p["w_out"].t(), y)


def param_groups(p):
    """Matrices with decay and lr 1e-2, vectors (biases, expert biases) without and lr 5e-3."""
    decay = [(k, v) for k, v in p.items() if k in ("w_in", "w_out", "e_w")]
    plain = [(k, v) for k, v in p.items() if k in ("b_in", "e_b")]
    return [{"params": decay, "weight_decay": 0.1, "lr": 1e-2}, {"params": plain, "weight_decay": 0.0, "lr": 5e-3}]


def reference(world):
    p = {k: torch.nn.Parameter(v) for k, v in weights().items()}
    optimizer = torch.optim.AdamW([{**g, "params": [v for _, v in g["params"]]} for g in param_groups(p)])
    norms, first_grads = [], None
    for step in range(STEPS):
        loss = 0
        for r in range(world):
            x, y = batch(r, step)
            loss = loss + loss_of(p, x, y, experts_out(p, x, 0)) / world
        loss.backward()
        if step == 0:
            first_grads = {k: v.grad.clone() for k, v in p.items()}
        norms.append(torch.nn.utils.clip_grad_norm_(p.values(), MAX_NORM).item())
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach() for k, v in p.items()}, norms, first_grads


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) forward and backward: each rank's partial expert outputs for every token."""

    @staticmethod
    def forward(ctx, partial, group):
        ctx.group = group
        out = partial.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def local_params(ps):
    full, local = weights(), EXPERTS // ps.ep.size
    first = ps.ep.rank * local
    p = {k: torch.nn.Parameter(full[k].clone()) for k in DENSE}
    p |= {k: mark_expert_parallel(torch.nn.Parameter(full[k][first : first + local].clone())) for k in EXPERT}
    return p, first


def forward_backward(p, ps, first, step):
    x, y = batch(dist.get_rank(), step)
    gathered = [torch.empty_like(x) for _ in range(ps.ep.size)]
    dist.all_gather(gathered, x, group=ps.ep.group)
    everyone = torch.cat(gathered)
    moe = _SumOverGroup.apply(experts_out(p, everyone, first), ps.ep.group)
    loss_of(p, x, y, moe[ps.ep.rank * BATCH : (ps.ep.rank + 1) * BATCH]).backward()


def train(ep, stage, collectives="auto"):
    with pstate.initialize(pstate.ParallelConfig(ep=ep)) as ps:
        p, first = local_params(ps)
        optimizer = ShardedOptimizer(
            param_groups(p),
            torch.optim.AdamW,
            group=ps.dp,
            expert_group=ps.edp,
            stage=stage,
            bucket_size_mb=BUCKET_MB,
            collectives=collectives,
        )
        norms, shards = [], {}
        for step in range(STEPS):
            forward_backward(p, ps, first, step)
            if step == 0:
                for k, v in p.items():
                    owned = optimizer.grads_of(v).owned(v)
                    if owned is not None:
                        shards[k] = (owned.start, owned.stop, owned.grad.clone())
            norms.append(optimizer.clip_grad_norm_(MAX_NORM, ep_group=ps.ep).item())
            optimizer.step()
            optimizer.zero_grad()
        per_element = sum(v.nbytes for s in optimizer.state.values() for n, v in s.items() if n != "step")
        return {
            "first": first,
            "params": {k: v.detach().clone() for k, v in p.items()},
            "norms": norms,
            "shards": shards,
            "state_bytes": per_element,
            "sizes": (ps.dp.size, ps.edp.size),
        }


LAYOUTS = [(4, 2), (4, 4), (4, 1), (2, 2)]  # (world, ep)


@pytest.mark.parametrize(("world", "ep"), LAYOUTS)
@pytest.mark.parametrize("stage", [1, 2])
def test_experts_sharded_over_edp_equal_single_process_adamw(run_ranks, world, ep, stage):
    want, norms, grads = reference(world)
    assert min(norms) > MAX_NORM  # clipping is active in every step
    results = run_ranks(world, train, ep, stage)
    assert results[0]["sizes"] == (world, world // ep)
    for got in results:
        local = EXPERTS // ep
        expected = {k: want[k] if k in DENSE else want[k][got["first"] : got["first"] + local] for k in want}
        expected_grads = {k: grads[k] if k in DENSE else grads[k][got["first"] : got["first"] + local] for k in grads}
        for name, (start, stop, shard) in got["shards"].items():
            torch.testing.assert_close(shard, expected_grads[name].reshape(-1)[start:stop])
        assert got["norms"] == pytest.approx(norms, rel=1e-5)
        for name, value in got["params"].items():
            torch.testing.assert_close(value, expected[name])
    # every element's AdamW moments (8 bytes) are held once over the world: dense over DP, experts over EDP
    numel = sum(v.numel() for v in want.values())
    assert sum(r["state_bytes"] for r in results) == 8 * numel


def test_reduce_scatter_collectives(run_ranks):
    want, norms, _ = reference(4)
    for got in run_ranks(4, train, 2, 2, "reduce_scatter"):
        assert got["norms"] == pytest.approx(norms, rel=1e-5)
        torch.testing.assert_close(got["params"]["e_w"], want["e_w"][got["first"] : got["first"] + 2])


def plain(state_dict):
    return {
        key: {n: (v.flat_range, v.data.clone()) if isinstance(v, Shard) else v.clone() for n, v in entry.items()}
        for key, entry in state_dict["state"].items()
    }


def round_trip(ep):
    """Train, save the state dict, load it into a fresh optimizer (its own state dict filled), and check
    one more step of each gives the same parameters. Also each rank's expert ranges, to check coverage."""
    with pstate.initialize(pstate.ParallelConfig(ep=ep)) as ps:

        def make():
            p, first = local_params(ps)
            options = dict(group=ps.dp, expert_group=ps.edp, stage=2, bucket_size_mb=BUCKET_MB)
            return p, first, ShardedOptimizer(param_groups(p), torch.optim.AdamW, **options)

        p, first, optimizer = make()
        for step in range(STEPS - 1):
            forward_backward(p, ps, first, step)
            optimizer.step()
            optimizer.zero_grad()
        saved = plain(optimizer.state_dict())
        q, _, fresh = make()
        own = fresh.state_dict()
        for key, entry in own["state"].items():
            for name, value in entry.items():
                if isinstance(value, Shard):
                    value.data.copy_(saved[key][name][1])
                else:
                    entry[name] = saved[key][name]
        fresh.load_state_dict(own)
        for model, opt in ((p, optimizer), (q, fresh)):
            forward_backward(model, ps, first, STEPS - 1)
            opt.step()
        same = all(torch.equal(p[k], q[k]) for k in p)
        ranges = {k: saved[k]["exp_avg"][0] for k in EXPERT}
        return same, ps.edp.ranks, ranges, {k: int(saved[k]["step"]) for k in p}


def test_state_dict_round_trip_covers_expert_entries(run_ranks):
    results = run_ranks(4, round_trip, 2)
    local = (EXPERTS // 2) * HIDDEN
    for same, edp, _, steps in results:
        assert same
        assert set(steps.values()) == {STEPS - 1}
        for name, numel in (("e_w", local * IN), ("e_b", local)):
            spans = sorted(results[r][2][name] for r in edp)  # the EDP ranks own disjoint pieces of all
            assert spans[0][0] == 0 and spans[-1][1] == numel
            assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))


def overflow_in_one_expert_shard():
    """An inf in the expert gradient shard of one rank only: every rank skips the step and backs off."""
    with pstate.initialize(pstate.ParallelConfig(ep=2)) as ps:
        p, first = local_params(ps)
        scaler = LossScaler(init_scale=4.0)
        options = dict(group=ps.dp, expert_group=ps.edp, loss_scaler=scaler, bucket_size_mb=BUCKET_MB)
        optimizer = ShardedOptimizer(param_groups(p), torch.optim.AdamW, **options)
        before = {k: v.detach().clone() for k, v in p.items()}
        forward_backward(p, ps, first, 0)
        shard = optimizer.grad_shard(p["e_w"])
        if dist.get_rank() == 3 and shard is not None and shard.numel():
            shard[0] = float("inf")
        optimizer.step()
        return scaler.scale, all(torch.equal(before[k], p[k]) for k in p)


def test_an_overflow_in_an_expert_shard_skips_the_step_everywhere(run_ranks):
    assert run_ranks(4, overflow_in_one_expert_shard) == [(2.0, True)] * 4


def refused():
    with pstate.initialize(pstate.ParallelConfig(ep=2)) as ps:
        p, _ = local_params(ps)
        try:
            ShardedOptimizer(param_groups(p), torch.optim.AdamW, group=ps.dp)
        except DataParallelError as error:
            return str(error)
        return None


def test_expert_parameters_without_expert_group_are_refused(run_ranks):
    for message in run_ranks(2, refused):
        assert "2 parameters (e.g. 'e_w') are tagged expert_parallel: they need expert_group=" in message

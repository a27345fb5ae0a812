"""``PipelineExecutor`` on real ranks (gloo) against the whole model in one process.

The model is 8 ``Linear(16, 16)`` + tanh layers built after one ``torch.manual_seed`` on every rank, so
layer ``i`` has the same weights on whichever stage ``split_layers`` puts it. Each rank runs two training
steps of 8 microbatches (the gradients accumulate, so they must be twice the reference's) and returns
its losses, its layers' gradients, its peak activation count and what the hooks saw.

Tolerance: ``torch.testing``'s float32 default (rtol 1.3e-6, atol 1e-5). The pipeline sums the
gradients of 8 microbatch losses scaled by 1/8 where the reference backpropagates the mean over the
whole batch at once: the same products added in another order, which changes only the last bits.
"""

from collections import Counter
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
from torch import nn

from pp_sched import Action, PipelineExecutor, PipelineScheduleError, build, simulate, split_layers, validate

SEED, LAYERS, HIDDEN, MICROBATCHES, BATCH = 1234, 8, 16, 8, 3
CASES = [
    ("gpipe", 2, 1),
    ("gpipe", 4, 1),
    ("1f1b", 2, 1),
    ("1f1b", 4, 1),
    ("interleaved-1f1b", 2, 2),
    ("interleaved-1f1b", 4, 2),
    ("zero-bubble", 2, 1),
    ("zero-bubble", 4, 1),
    ("zb-v", 2, 2),
    ("zb-v", 4, 2),
    ("dualpipe-v", 2, 2),
    ("dualpipe-v", 4, 2),
]


def all_layers():
    torch.manual_seed(SEED)
    return [nn.Linear(HIDDEN, HIDDEN) for _ in range(LAYERS)]


def chunks_of(rank, pp, vpp, layout="looped"):
    """This rank's chunk modules (chunk ``c`` holds stage ``schedule.stage_of(rank, c)``) and its layers by
    global index."""
    layers = all_layers()
    chunks, owned = [], {}
    for stage in split_layers(LAYERS, pp=pp, vpp=vpp, layout=layout):
        if stage.rank == rank:
            chunks.append(nn.Sequential(*[m for i in stage.layers for m in (layers[i], nn.Tanh())]))
            owned.update({i: layers[i] for i in stage.layers})
    return chunks, owned


def data(microbatches=MICROBATCHES):
    """Inputs and targets, ``[microbatch, batch, hidden]``."""
    generator = torch.Generator().manual_seed(7)
    shape = (microbatches, BATCH, HIDDEN)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def loss_fn(output, target):
    return nn.functional.mse_loss(output, target)


def reference(microbatches=MICROBATCHES):
    """Per-microbatch losses and outputs, and every layer's (weight, bias) gradient of the full-batch mean loss."""
    layers = all_layers()
    model = nn.Sequential(*[m for layer in layers for m in (layer, nn.Tanh())])
    x, y = data(microbatches)
    out = model(x.reshape(-1, HIDDEN)).reshape(x.shape)
    loss_fn(out, y).backward()
    losses = [loss_fn(out[i], y[i]).detach() for i in range(microbatches)]
    return losses, out.detach(), {i: (layer.weight.grad, layer.bias.grad) for i, layer in enumerate(layers)}


def train(name, pp, vpp, microbatches=MICROBATCHES):
    rank = dist.get_rank()
    schedule = build(name, pp=pp, microbatches=microbatches, vpp=vpp)
    chunks, owned = chunks_of(rank, pp, vpp, schedule.layout)
    last = schedule.rank_of(schedule.num_stages - 1)
    entered, ready, exited_late = Counter(), [], []

    @contextmanager
    def no_sync(chunk):
        entered[chunk] += 1
        if chunk in ready:
            exited_late.append(chunk)
        yield

    final_at_callback = {}

    def on_ready(chunk):
        ready.append(chunk)
        final_at_callback[chunk] = [p.grad.clone() for p in chunks[chunk].parameters()]

    accumulated = Counter()  # post-accumulate hooks fire for B and W (what a data-parallel wrapper sees)
    for i, layer in owned.items():
        layer.weight.register_post_accumulate_grad_hook(lambda _, i=i: accumulated.update([i]))
    executor = PipelineExecutor(
        schedule, chunks, dist.group.WORLD, loss_fn, no_sync=no_sync, on_chunk_grads_ready=on_ready
    )
    x, y = data(microbatches)
    results = []
    for _ in range(2):
        ready.clear()
        inputs = list(x) if rank == 0 else None
        targets = iter(y) if rank == last else None  # an iterator works as well as a list
        results.append(executor.step(inputs, targets))
    grads = {i: (layer.weight.grad, layer.bias.grad) for i, layer in owned.items()}
    unchanged = all(
        torch.equal(before, p.grad)
        for c, saved in final_at_callback.items()
        for before, p in zip(saved, chunks[c].parameters())
    )
    hooks = {
        "entered": dict(entered),
        "ready": list(ready),
        "late": exited_late,
        "unchanged": unchanged,
        "accumulated": dict(accumulated),
    }
    peaks = [(r.peak_activations, r.peak_pending_w) for r in results]
    return [r.losses for r in results], grads, peaks, hooks


def check_parity(results, name, pp, vpp, microbatches):
    ref_losses, _, ref_grads = reference(microbatches)
    last = build(name, pp=pp, microbatches=microbatches, vpp=vpp).rank_of(pp * vpp - 1)
    for rank, (losses, _, _, _) in enumerate(results):
        if rank == last:
            for step_losses in losses:
                torch.testing.assert_close(torch.stack(step_losses), torch.stack(ref_losses))
        else:
            assert losses == [[], []]
    grads = {i: g for _, rank_grads, _, _ in results for i, g in rank_grads.items()}
    assert sorted(grads) == list(range(LAYERS))
    for i, (weight_grad, bias_grad) in grads.items():  # two steps accumulate: twice the reference
        torch.testing.assert_close(weight_grad, 2 * ref_grads[i][0])
        torch.testing.assert_close(bias_grad, 2 * ref_grads[i][1])


@pytest.mark.parametrize(("name", "pp", "vpp"), CASES)
def test_losses_and_gradients_equal_the_single_process_model(run_ranks, name, pp, vpp):
    check_parity(run_ranks(pp, train, name, pp, vpp), name, pp, vpp, MICROBATCHES)


@pytest.mark.parametrize(
    ("name", "pp", "microbatches"),
    [("zb-v", 2, 1), ("zb-v", 2, 3), ("zb-v", 4, 5), ("dualpipe-v", 2, 5), ("dualpipe-v", 4, 3), ("dualpipe-v", 4, 12)],
)
def test_v_schedules_equal_the_single_process_model_for_other_microbatch_counts(run_ranks, name, pp, microbatches):
    check_parity(run_ranks(pp, train, name, pp, 2, microbatches), name, pp, 2, microbatches)


@pytest.mark.parametrize(("name", "pp", "vpp"), CASES)
def test_peak_activations_and_hooks(run_ranks, name, pp, vpp):
    sim = simulate(build(name, pp=pp, microbatches=MICROBATCHES, vpp=vpp))
    results = run_ranks(pp, train, name, pp, vpp)
    for rank, (_, _, peaks, hooks) in enumerate(results):
        assert peaks == [(sim.peak_activations[rank], sim.peak_pending_w[rank])] * 2
        assert set(hooks["accumulated"].values()) == {2 * MICROBATCHES}  # once per microbatch and step
        # no_sync around every backward of a chunk but its last, in both steps; the callback once per chunk
        assert hooks["entered"] == {chunk: 2 * (MICROBATCHES - 1) for chunk in range(vpp)}
        assert sorted(hooks["ready"]) == list(range(vpp))
        assert hooks["late"] == []  # no no_sync after the chunk was reported ready
        assert hooks["unchanged"]  # the gradients were final when the callback ran


def evaluate(name, pp, vpp):
    rank = dist.get_rank()
    schedule = build(name, pp=pp, microbatches=MICROBATCHES, vpp=vpp)
    chunks, owned = chunks_of(rank, pp, vpp, schedule.layout)
    executor = PipelineExecutor(schedule, chunks, dist.group.WORLD, loss_fn)
    x, y = data()
    last = schedule.rank_of(schedule.num_stages - 1)
    result = executor.evaluate(x if rank == 0 else None, y if rank == last else None)  # a tensor iterates too
    no_grads = all(layer.weight.grad is None and layer.bias.grad is None for layer in owned.values())
    return result.losses, result.outputs, no_grads


@pytest.mark.parametrize(
    ("name", "pp", "vpp"),
    [("1f1b", 4, 1), ("interleaved-1f1b", 2, 2), ("zero-bubble", 2, 1), ("zb-v", 4, 2), ("dualpipe-v", 2, 2)],
)
def test_forward_only_gives_the_losses_and_outputs_without_gradients(run_ranks, name, pp, vpp):
    ref_losses, ref_out, _ = reference()
    results = run_ranks(pp, evaluate, name, pp, vpp)
    last = build(name, pp=pp, microbatches=MICROBATCHES, vpp=vpp).rank_of(pp * vpp - 1)
    losses, outputs, _ = results[last]
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses))
    torch.testing.assert_close(torch.stack(outputs), ref_out)
    assert all(no_grads for _, _, no_grads in results)
    assert all(losses == [] and outputs == [] for r, (losses, outputs, _) in enumerate(results) if r != last)


def deadlocking_schedule():
    """1F1B at pp=2 with rank 1's forwards swapped: rank 1 waits for F1 that rank 0 sends only after B0,
    which needs rank 1's B0, which comes after F1."""
    good = build("1f1b", pp=2, microbatches=2)
    rank0 = [Action("F", 0), Action("B", 0), Action("F", 1), Action("B", 1)]
    rank1 = [Action("F", 1), Action("F", 0), Action("B", 0), Action("B", 1)]
    return good.with_actions([rank0, rank1])


def construct(schedule):
    chunks, _ = chunks_of(dist.get_rank(), schedule.pp, schedule.vpp)
    try:
        PipelineExecutor(schedule, chunks, dist.group.WORLD, loss_fn)
    except PipelineScheduleError as error:
        return str(error)
    return None


def test_a_deadlocking_schedule_is_refused_before_any_communication(run_ranks):
    schedule = deadlocking_schedule()
    with pytest.raises(PipelineScheduleError, match="deadlock"):
        validate(schedule)
    messages = run_ranks(2, construct, schedule)
    assert all(m is not None and "deadlock" in m and "rank 1 is stuck at action 0" in m for m in messages)


def test_an_incomplete_schedule_is_refused(run_ranks):
    good = build("zero-bubble", pp=2, microbatches=2)
    broken = good.with_actions([good.actions[0], [a for a in good.actions[1] if a != Action("W", 1)]])
    messages = run_ranks(2, construct, broken)
    assert all("has I but no W for microbatch 1" in m for m in messages)


def plans_derived(name, pp, vpp):
    """Three training steps and two evaluations; how often each rank derived a posting plan."""
    import pp_sched.executor as executor_module

    calls = []
    original = executor_module.posting_orders

    def counting(schedule, **kwargs):
        calls.append(kwargs["train"])
        return original(schedule, **kwargs)

    executor_module.posting_orders = counting
    try:
        rank = dist.get_rank()
        schedule = build(name, pp=pp, microbatches=MICROBATCHES, vpp=vpp)
        chunks, _ = chunks_of(rank, pp, vpp, schedule.layout)
        executor = PipelineExecutor(schedule, chunks, dist.group.WORLD, loss_fn)
        x, y = data()
        last = schedule.rank_of(schedule.num_stages - 1)
        for _ in range(3):
            executor.step(list(x) if rank == 0 else None, list(y) if rank == last else None)
        for _ in range(2):
            executor.evaluate(list(x) if rank == 0 else None, list(y) if rank == last else None)
    finally:
        executor_module.posting_orders = original
    return calls


@pytest.mark.parametrize(("name", "pp", "vpp"), [("interleaved-1f1b", 2, 2), ("dualpipe-v", 2, 2)])
def test_the_posting_plan_is_derived_once_per_mode_not_per_step(run_ranks, name, pp, vpp):
    assert run_ranks(pp, plans_derived, name, pp, vpp) == [[True, False]] * pp

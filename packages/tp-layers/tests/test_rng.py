"""The RNG tracker and recomputation: dropout masks agree across TP ranks in replicated regions and
differ in sharded ones, and a recomputed forward draws exactly the masks of the first forward."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint

from tp_layers import MODEL_PARALLEL, RNGTracker, TensorParallelError, recompute, seed_tensor_parallel


def masks_on_each_rank():
    tracker = seed_tensor_parallel(1234, tp_rank=dist.get_rank())
    ones = torch.ones(64)
    replicated = F.dropout(ones, 0.5)
    with tracker.fork():
        sharded = F.dropout(ones, 0.5)
    after = F.dropout(ones, 0.5)
    torch.manual_seed(1234)  # the same draws without the fork in between
    unforked = F.dropout(ones, 0.5), F.dropout(ones, 0.5)
    return replicated, sharded, after, unforked


def test_replicated_masks_agree_and_sharded_masks_differ_across_ranks(run_ranks):
    results = run_ranks(4, masks_on_each_rank)
    for replicated, _, after, unforked in results:
        assert torch.equal(replicated, results[0][0]) and torch.equal(after, results[0][2])
        assert torch.equal(replicated, unforked[0]) and torch.equal(after, unforked[1])  # fork left no trace
    sharded = [r[1] for r in results]
    assert all(not torch.equal(a, b) for i, a in enumerate(sharded) for b in sharded[i + 1 :])


def test_fork_advances_its_own_state_only():
    tracker = RNGTracker()
    tracker.add("a", 1)
    tracker.add("b", 1)
    with tracker.fork("a"):
        first = torch.rand(4)
    with tracker.fork("a"):
        second = torch.rand(4)
    with tracker.fork("b"):
        again = torch.rand(4)
    assert not torch.equal(first, second)  # "a" moved on
    assert torch.equal(first, again)  # "b", seeded alike, had not
    assert tracker.names == ("a", "b")


def test_states_round_trip_and_bad_names_are_refused():
    tracker = RNGTracker()
    tracker.add(MODEL_PARALLEL, 5)
    saved = tracker.get_states()
    with tracker.fork():
        first = torch.rand(3)
    tracker.set_states(saved)
    with tracker.fork():
        assert torch.equal(torch.rand(3), first)
    with pytest.raises(TensorParallelError, match="state 'model-parallel' already exists"):
        tracker.add(MODEL_PARALLEL, 6)
    with (
        pytest.raises(TensorParallelError, match=r"no state named 'other' \(have \['model-parallel'\]\)"),
        tracker.fork("other"),
    ):
        pass


def block(x, tracker, record):
    """Dropout in a replicated region, then in a sharded one (under the tracker), recording the masks."""
    a = F.dropout(x, 0.5)
    with tracker.fork():
        b = F.dropout(a.sin(), 0.5)
    record.append(((a != 0), (b != 0)))
    return b.cos()


def run_training_step(checkpoint):
    """Forward through ``block``, another forward (another micro-batch) in between, then backward."""
    tracker = seed_tensor_parallel(7, tp_rank=1)
    x = torch.linspace(-1, 1, 256, requires_grad=True)
    record = []
    y = checkpoint(tracker, x, record)
    with tracker.fork():
        F.dropout(torch.ones(16), 0.5)  # the tracker moves on before this backward runs
    state_before_backward = tracker.get_states()
    y.sum().backward()
    return x.grad, record, state_before_backward, tracker.get_states()


def with_recompute(tracker, x, record):
    return recompute(block, x, tracker, record, tracker=tracker)


def plain(tracker, x, record):
    return block(x, tracker, record)


def torch_checkpoint_only(tracker, x, record):
    return torch.utils.checkpoint.checkpoint(block, x, tracker, record, use_reentrant=False)


def test_recompute_replays_the_same_dropout_masks():
    grad, record, before, after = run_training_step(with_recompute)
    assert len(record) == 2  # forward, then the recomputation in backward
    (fwd_a, fwd_b), (re_a, re_b) = record
    assert torch.equal(fwd_a, re_a) and torch.equal(fwd_b, re_b)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the tracker is left where it was
    reference_grad, _, _, _ = run_training_step(plain)
    assert torch.equal(grad, reference_grad)


def test_without_restoring_the_tracker_the_recomputed_masks_differ():
    """The control: PyTorch's checkpoint restores the default generator but not the tracker's states."""
    _, record, _, _ = run_training_step(torch_checkpoint_only)
    (fwd_a, fwd_b), (re_a, re_b) = record
    assert torch.equal(fwd_a, re_a)
    assert not torch.equal(fwd_b, re_b)


@pytest.mark.cuda
def test_the_tracker_drives_the_device_generator():
    device = torch.device("cuda", torch.cuda.current_device())
    tracker = RNGTracker(device)
    tracker.add(MODEL_PARALLEL, 3)
    torch.cuda.manual_seed(0)
    outside = torch.cuda.get_rng_state(device)
    with tracker.fork():
        first = torch.rand(8, device=device)
    assert torch.equal(torch.cuda.get_rng_state(device), outside)
    assert torch.equal(first, torch.rand(8, device=device, generator=torch.Generator(device).manual_seed(3)))

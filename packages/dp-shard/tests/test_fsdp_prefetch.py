"""ZeRO-3's prefetch: the next unit's all-gather is launched, asynchronously, before the current unit
computes, in forward order and in backward order (its reverse), over the shard group.

Hooks registered after ``fully_shard`` run after its own: a forward pre-hook on each block sees the
moment the block starts computing, a hook on each block's output the moment its backward starts. At
those moments the test records which units have been gathered (the all-gathers ``pstate.comm``
recorded, in order, identified by their payload sizes: every block is given another width) and whether
the next unit's gather is still in flight (launched asynchronously, not waited for). Without prefetch
only the current unit is gathered. Order, not time, is checked: no clock.
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dp_shard.fully_shard import fully_shard, sharded_state
from pstate.comm import CommRecorder

WIDTHS = (4, 6, 8, 10)  # block i is a Linear(H, H) plus a vector of WIDTHS[i] * 2 elements (a distinct size)
H = 8


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(H, H)
        self.tag = nn.Parameter(torch.zeros(2 * width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(h)) + self.tag.sum()


class Net(nn.Sequential):
    """A Linear (the root's own parameters) and the blocks; the output is the root's own tensor, so the
    root's backward hook runs first, ahead of the last block's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).sum()


def observe(prefetch: bool):
    torch.manual_seed(0)
    model = Net(nn.Linear(H, H), *[Block(w) for w in WIDTHS])
    fully_shard(model, group=dist.group.WORLD, units=Block, prefetch=prefetch)
    state = sharded_state(model)
    flats = {id(u.module): u for u in state.units}
    size_of = {u.padded * 4: (u.name or "root") for u in state.units}
    recorder = CommRecorder()
    events = []

    def gathered() -> list[str]:
        return [size_of[r.bytes] for r in recorder.records if r.op == "all_gather"]

    def in_flight(index: int) -> bool:
        return 0 <= index < len(WIDTHS) and flats[id(model[index + 1])]._gather_work is not None

    for i, block in enumerate(model[1:]):

        def pre(module, args, i=i):
            events.append(("F", i, gathered(), in_flight(i + 1)))

        def post(module, args, out, i=i):
            out.register_hook(lambda g: events.append(("B", i, gathered(), in_flight(i - 1))))

        block.register_forward_pre_hook(pre)
        block.register_forward_hook(post)
    x = torch.randn(2, H)
    with recorder:
        model(x).backward()  # a first step: the backward order is learned from this forward
        recorder.clear()
        events.clear()
        model(x).backward()
    return events


@pytest.mark.parametrize("prefetch", [True, False])
def test_next_units_gather_is_launched_before_the_current_unit_computes(run_ranks, prefetch):
    names = [f"{i + 1}" for i in range(len(WIDTHS))]
    for events in run_ranks(2, observe, prefetch):
        forward = [e for e in events if e[0] == "F"]
        backward = [e for e in events if e[0] == "B"]
        assert [e[1] for e in forward] == [0, 1, 2, 3] and [e[1] for e in backward] == [3, 2, 1, 0]
        for _, i, gathered, next_in_flight in forward:
            ahead = names[: i + 2] if prefetch else names[: i + 1]  # this unit and, prefetched, the next
            assert gathered == ["root", *ahead]
            assert next_in_flight == (prefetch and i + 1 < len(WIDTHS))
        forward_gathers = ["root", *names]
        for _, i, gathered, next_in_flight in backward:
            # the root first (its output starts the backward), then each unit again in reverse order and,
            # prefetched, the one the backward reaches next
            order = names[::-1]
            done = order[: len(WIDTHS) - i + (1 if prefetch and i > 0 else 0)]
            assert gathered == [*forward_gathers, "root", *done]
            assert next_in_flight == (prefetch and i > 0)

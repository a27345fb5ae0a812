"""Aux-loss-free balancing in training: after each optimizer step, every MoE router with an expert bias
moves it by the tokens each of its experts received during the step (all micro-batches).

A router's counts are taken once per micro-batch: when the gradient of its output arrives in backward,
so a forward recomputed in backward (its output gets no gradient) and an evaluation forward (no
gradient at all) are not counted. They are summed over the ranks of the pipeline stage that routed
other tokens of the step: the data-parallel ranks (expert-parallel ranks are data-parallel ranks of
the dense layers, each with its own tokens), the context-parallel ranks and, under sequence
parallelism, the tensor-parallel ranks (``tp_dp_cp``); without sequence parallelism the TP ranks route
the same tokens (``dp_cp``). Every rank of the stage then makes the same update, the one a single
process makes from the whole global batch; a stage whose layers have no bias takes no part.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from moe_dispatch import TopKRouter
from pstate import Group, comm


class ExpertBiasUpdater:
    """Counts the tokens per expert of ``chunks``' biased routers over a step and updates their biases by
    ``rate`` (``bias += rate * sign(mean load - load)``) from the counts summed over ``group``."""

    def __init__(self, chunks: Sequence[nn.Module], group: Group, rate: float) -> None:
        self.routers = [
            m for c in chunks for m in c.modules() if isinstance(m, TopKRouter) and m.expert_bias is not None
        ]
        self.group, self.rate = group, rate
        self.counts = [torch.zeros(r.num_experts, dtype=torch.int64, device=r.expert_bias.device) for r in self.routers]
        for router, count in zip(self.routers, self.counts):
            router.register_forward_hook(_count_in_backward(count))

    def step(self, skipped: bool) -> None:
        """After the optimizer step (collective over ``group``): update the biases unless the step was
        ``skipped`` (a skipped step changes nothing), then start counting the next step."""
        if not self.routers:
            return
        if not skipped:
            for router, load in zip(self.routers, self.loads()):
                router.update_expert_bias(load, self.rate)
        for count in self.counts:
            count.zero_()

    def loads(self) -> list[torch.Tensor]:
        """Each biased router's tokens per expert in this step, over every rank of ``group`` (one
        all-reduce)."""
        total = torch.cat(self.counts)
        comm.all_reduce(total, group=self.group)
        return list(total.split([c.numel() for c in self.counts]))


def _count_in_backward(count: torch.Tensor) -> Any:
    """A forward hook adding the router's ``tokens_per_expert`` to ``count`` when its ``probs`` output gets
    its gradient."""

    def hook(router: TopKRouter, inputs: Any, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        probs = output[0]
        if probs.requires_grad:
            tokens = router.tokens_per_expert.detach().to(count.device, torch.int64)

            def add(grad: torch.Tensor) -> None:
                count.add_(tokens)

            probs.register_hook(add)

    return hook

"""``GroupedExperts``: this rank's experts, each a two-layer MLP, run over their token groups.

Two paths behind one switch, ``gemm``: ``"loop"`` runs one pair of matmuls per expert (the reference);
``"grouped"`` runs each layer of all local experts as one grouped GEMM (:mod:`moe_dispatch.grouped_gemm`);
``"auto"`` (default) takes the grouped GEMM wherever torch can run it on the weights' dtype, device and
sizes, else the loop. Both compute the same sums per row.

Layout (global expert ``e``, ``f = ffn_hidden``): ``fc1`` is ``[f_out, hidden]`` with ``f_out = 2f`` for
SwiGLU (rows ``[gate; up]``) or ``f`` for GELU; ``fc2`` is ``[hidden, f]``. No biases. The local weights
are stacked as ``weight1 [num_local_experts, f_out/etp, hidden]`` and ``weight2 [num_local_experts,
hidden, f/etp]``. Under expert tensor parallelism fc1 is column-split (ETP rank ``q`` holds gate and
up rows ``[q*f/etp, (q+1)*f/etp)``) and fc2 row-split, and the output is a *partial* sum over the ETP
group: the dispatcher's combine completes it (no all-reduce here).

Initialisation is invariant to EP and ETP: expert ``e`` draws its full fc1 then fc2 (like ``nn.Linear``)
from a generator seeded with ``seed * 1_000_003 + e``; with ``seed=None`` one base seed is drawn from the
default generator (identical on every rank after the same ``torch.manual_seed``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pstate.tags import mark_expert_parallel
from tp_layers import init as tp_init
from tp_layers import mark_tensor_parallel

from . import grouped_gemm
from .comm import GroupOrNone, rank_in, size_of
from .errors import MoEError

ACTIVATIONS = ("swiglu", "gelu")


def expert_seed(seed: int, expert: int) -> int:
    """The seed of global expert ``expert``'s weights."""
    return (seed * 1_000_003 + expert) % (2**63)


def full_expert_weights(
    seed: int, expert: int, hidden: int, ffn_hidden: int, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unsplit ``(fc1, fc2)`` float32 weights of global expert ``expert``."""
    generator = torch.Generator().manual_seed(expert_seed(seed, expert))
    f_out = 2 * ffn_hidden if activation == "swiglu" else ffn_hidden
    fc1 = tp_init.draw((f_out, hidden), tp_init.linear_init, generator)
    fc2 = tp_init.draw((hidden, ffn_hidden), tp_init.linear_init, generator)
    return fc1, fc2


def shard_expert_weights(
    fc1: torch.Tensor, fc2: torch.Tensor, activation: str, rank: int, parts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ETP rank ``rank``'s slices of an expert's full weights (gate and up are split separately)."""
    if activation == "swiglu":
        gate, up = fc1.chunk(2, 0)
        fc1_part = torch.cat([tp_init.shard(gate, 0, rank, parts), tp_init.shard(up, 0, rank, parts)])
    else:
        fc1_part = tp_init.shard(fc1, 0, rank, parts)
    return fc1_part, tp_init.shard(fc2, 1, rank, parts)


class GroupedExperts(nn.Module):
    """``num_local_experts`` MLP experts (global indices from ``first_expert``), optionally split over ETP.

    ``forward(x, tokens_per_expert)`` takes rows grouped by local expert (``tokens_per_expert[i]`` rows
    for local expert ``i``, in order) and returns the outputs in the same order. ``gemm`` picks the
    path: ``"auto"``, ``"grouped"`` (refused at construction where torch cannot run it) or ``"loop"``.
    """

    def __init__(
        self,
        num_local_experts: int,
        hidden: int,
        ffn_hidden: int,
        *,
        activation: str = "swiglu",
        etp_group: GroupOrNone = None,
        first_expert: int = 0,
        gemm: str = "auto",
        seed: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        etp = size_of(etp_group)
        if activation not in ACTIVATIONS:
            raise MoEError(f"activation={activation!r}: must be one of {ACTIVATIONS}")
        if num_local_experts < 1:
            raise MoEError(f"num_local_experts={num_local_experts}: must be at least 1")
        if ffn_hidden % etp:
            raise MoEError(f"ffn_hidden={ffn_hidden}: must be divisible by the expert-tensor-parallel size {etp}")
        if gemm not in grouped_gemm.GEMMS:
            raise MoEError(f"gemm={gemm!r}: must be one of {grouped_gemm.GEMMS}")
        self.num_local_experts, self.activation, self.etp_group = num_local_experts, activation, etp_group
        self.gemm = gemm
        self.first_expert = first_expert
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        fc1s, fc2s = [], []
        for e in range(first_expert, first_expert + num_local_experts):
            fc1, fc2 = full_expert_weights(seed, e, hidden, ffn_hidden, activation)
            fc1, fc2 = shard_expert_weights(fc1, fc2, activation, rank_in(etp_group), etp)
            fc1s.append(fc1)
            fc2s.append(fc2)
        kind = {"dtype": dtype or torch.get_default_dtype(), "device": device}
        self.weight1 = nn.Parameter(torch.stack(fc1s).to(**kind))
        self.weight2 = nn.Parameter(torch.stack(fc2s).to(**kind))
        mark_tensor_parallel(mark_expert_parallel(self.weight1), 1)
        mark_tensor_parallel(mark_expert_parallel(self.weight2), 2)
        if gemm == "grouped" and (reason := self._grouped_unsupported()):
            raise MoEError(f"gemm='grouped': {reason}; use gemm='auto' or 'loop'")

    def _grouped_unsupported(self) -> str | None:
        sizes = (self.weight1.size(2), self.weight2.size(2))
        return grouped_gemm.unsupported_reason(self.weight1.dtype, self.weight1.device, sizes)

    def uses_grouped_gemm(self) -> bool:
        """Whether :meth:`forward` runs the grouped GEMM with the current weights (else the loop)."""
        return self.gemm != "loop" and self._grouped_unsupported() is None

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor | list[int]) -> torch.Tensor:
        """Outputs ``[rows, hidden]`` (partial sums over ETP when ``etp > 1``)."""
        counts = tokens_per_expert.tolist() if isinstance(tokens_per_expert, torch.Tensor) else list(tokens_per_expert)
        if len(counts) != self.num_local_experts or sum(counts) != x.size(0) or min(counts) < 0:
            raise MoEError(
                f"GroupedExperts: tokens_per_expert {counts} must have {self.num_local_experts} non-negative "
                f"entries summing to the {x.size(0)} input rows"
            )
        if self.gemm != "loop":
            reason = self._grouped_unsupported()
            if reason is None:
                ends = grouped_gemm.group_ends(counts, x.device)
                h = grouped_gemm.grouped_linear(x, self.weight1, ends)
                return grouped_gemm.grouped_linear(self._activate(h), self.weight2, ends)
            if self.gemm == "grouped":
                raise MoEError(f"gemm='grouped': {reason}")
        # unbind, not weight[i]: its backward stacks the per-expert gradients once, where indexing would
        # add a zero-filled gradient of the whole stacked weight for every expert.
        pairs = zip(x.split(counts), self.weight1.unbind(0), self.weight2.unbind(0))
        return torch.cat([F.linear(self._activate(F.linear(rows, w1)), w2) for rows, w1, w2 in pairs])

    def _activate(self, h: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            gate, up = h.chunk(2, -1)
            return F.silu(gate) * up
        return F.gelu(h)

    def extra_repr(self) -> str:
        return (
            f"num_local_experts={self.num_local_experts}, first_expert={self.first_expert}, "
            f"weight1={tuple(self.weight1.shape)}, weight2={tuple(self.weight2.shape)}, "
            f"activation={self.activation}, gemm={self.gemm}"
        )

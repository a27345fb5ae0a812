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
default generator (identical on every rank after the same ``torch.manual_seed``). A rank draws only its
own experts, and each of them as a stream of row chunks of at most :data:`DRAW_CHUNK_BYTES` from which it
keeps its ETP slice (:func:`stream_linear`: the same values as drawing the whole weight), so it never holds
more than its slices plus one chunk. With ``draw=False`` the
weights start at zero, holding only this rank's slices, for a caller that draws or loads them itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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


DRAW_CHUNK_BYTES = 64 * 2**20
"""The most a rank holds of an expert's weight beyond its own slice while drawing it (float32)."""


def linear_bound(fan_in: int) -> float:
    """The bound of ``nn.Linear``'s default weight, U(-bound, bound) (Kaiming uniform with ``a=sqrt(5)``),
    computed as ``torch.nn.init.kaiming_uniform_`` does."""
    gain = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))
    return math.sqrt(3.0) * (gain / math.sqrt(fan_in))


def stream_linear(
    shape: tuple[int, int], generator: torch.Generator | None, keep: Callable[[int, torch.Tensor], None]
) -> None:
    """Draw an ``nn.Linear`` weight of ``shape`` (what :func:`tp_layers.init.draw` with ``linear_init``
    draws from ``generator``, leaving it in the same state) as consecutive row chunks of at most
    :data:`DRAW_CHUNK_BYTES`, calling ``keep(first_row, chunk)`` with each: the uniform draw takes the
    generator's numbers one element after the other, so the chunks are the whole weight's rows."""
    rows, cols = shape
    bound, per_chunk = linear_bound(cols), max(1, DRAW_CHUNK_BYTES // 4 // cols)
    for start in range(0, rows, per_chunk):
        keep(start, draw_chunk(min(per_chunk, rows - start), cols, bound, generator))


def draw_chunk(rows: int, cols: int, bound: float, generator: torch.Generator | None) -> torch.Tensor:
    """``[rows, cols]`` float32 from U(-bound, bound), continuing ``generator``."""
    return torch.empty(rows, cols).uniform_(-bound, bound, generator=generator)


def keep_rows(out: torch.Tensor, first: int) -> Callable[[int, torch.Tensor], None]:
    """A ``keep`` for :func:`stream_linear` that copies rows ``[first, first + len(out))`` into ``out``."""

    def keep(start: int, chunk: torch.Tensor) -> None:
        lo, hi = max(start, first), min(start + chunk.size(0), first + out.size(0))
        if lo < hi:
            out[lo - first : hi - first] = chunk[lo - start : hi - start]

    return keep


def keep_columns(out: torch.Tensor, first: int) -> Callable[[int, torch.Tensor], None]:
    """A ``keep`` for :func:`stream_linear` that copies columns ``[first, first + out.size(1))`` into ``out``."""

    def keep(start: int, chunk: torch.Tensor) -> None:
        out[start : start + chunk.size(0)] = chunk[:, first : first + out.size(1)]

    return keep


def draw_expert_slices(
    seed: int, expert: int, fc1: torch.Tensor, fc2: torch.Tensor, activation: str, rank: int, parts: int
) -> None:
    """Fill ``fc1`` and ``fc2`` with ETP rank ``rank``'s slices (of ``parts``; gate and up split separately)
    of global expert ``expert``'s weights, streamed (:func:`stream_linear`): what
    :func:`shard_expert_weights` takes of :func:`full_expert_weights`, without the full weights."""
    generator = torch.Generator().manual_seed(expert_seed(seed, expert))
    hidden, f = fc1.size(1), fc2.size(1)  # f: this rank's slice of ffn_hidden
    ffn_hidden = f * parts
    halves = 2 if activation == "swiglu" else 1
    stream_linear((halves * ffn_hidden, hidden), generator, keep_parts(fc1, halves, ffn_hidden, rank))
    stream_linear((hidden, ffn_hidden), generator, keep_columns(fc2, rank * f))


def keep_parts(out: torch.Tensor, parts: int, width: int, rank: int) -> Callable[[int, torch.Tensor], None]:
    """A ``keep`` for :func:`stream_linear` of a weight made of ``parts`` blocks of ``width`` rows (``[gate;
    up]``, or one): copies rank ``rank``'s slice of every block into ``out``, one after the other (the
    rows a column-parallel rank holds)."""
    f = out.size(0) // parts
    keeps = [keep_rows(out[h * f : (h + 1) * f], h * width + rank * f) for h in range(parts)]

    def keep(start: int, chunk: torch.Tensor) -> None:
        for one in keeps:
            one(start, chunk)

    return keep


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
        draw: bool = True,
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
        kind = {"dtype": dtype or torch.get_default_dtype(), "device": device}
        f_out = (2 if activation == "swiglu" else 1) * ffn_hidden // etp
        self.weight1 = nn.Parameter(torch.zeros(num_local_experts, f_out, hidden, **kind))
        self.weight2 = nn.Parameter(torch.zeros(num_local_experts, hidden, ffn_hidden // etp, **kind))
        if draw:
            self.draw(int(torch.randint(0, 2**62, (1,)).item()) if seed is None else seed)
        mark_tensor_parallel(mark_expert_parallel(self.weight1), 1)
        mark_tensor_parallel(mark_expert_parallel(self.weight2), 2)
        if gemm == "grouped" and (reason := self._grouped_unsupported()):
            raise MoEError(f"gemm='grouped': {reason}; use gemm='auto' or 'loop'")

    def draw(self, seed: int) -> None:
        """Set the weights to the values drawn from ``seed`` (see the module), streamed: this rank's slices
        of its experts only, holding at most one chunk beside them."""
        rank, parts = rank_in(self.etp_group), size_of(self.etp_group)
        with torch.no_grad():
            for i in range(self.num_local_experts):
                expert = self.first_expert + i
                draw_expert_slices(seed, expert, self.weight1[i], self.weight2[i], self.activation, rank, parts)

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

"""``SharedExpert``: an always-on dense MLP that every token goes through beside its routed experts.

``y = fc2(act(fc1(x)))``, optionally times a sigmoid gate ``sigmoid(x @ gate_weight^T)`` (one scalar
per token, as in Qwen-MoE). With a ``tp_group`` it is split like a transformer MLP: ``fc1`` is a
``ColumnParallelLinear`` (for SwiGLU rank ``r`` holds its slice of the gate rows then its slice of the
up rows), ``fc2`` a ``RowParallelLinear``; with ``sequence_parallel=True`` the input is this rank's
sequence shard (all-gathered before fc1, reduce-scattered after fc2). Without a group it is two plain
linear layers on the full weights. No biases.

Initialisation is invariant to TP: the full fc1, fc2 and gate weights are drawn (``nn.Linear``'s
scheme) in that order from a generator seeded with ``seed`` (or the default generator), streamed in
bounded row chunks of which each rank keeps its slices (``experts.stream_linear``: the values of the
whole draw, without holding the whole weight). With ``draw=False`` they start at zero, for a caller that
draws or loads them itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pstate.tags import mark_sequence_parallel
from tp_layers import ColumnParallelLinear, RowParallelLinear
from tp_layers import init as tp_init

from .comm import GroupOrNone, rank_in, size_of
from .errors import MoEError
from .experts import ACTIVATIONS, keep_columns, keep_parts, keep_rows, stream_linear


class SharedExpert(nn.Module):
    """A dense MLP of width ``ffn_hidden`` applied to every token, TP-split over ``tp_group`` if given."""

    def __init__(
        self,
        hidden: int,
        ffn_hidden: int,
        *,
        activation: str = "swiglu",
        gate: bool = False,
        tp_group: GroupOrNone = None,
        sequence_parallel: bool = False,
        seed: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        draw: bool = True,
    ) -> None:
        super().__init__()
        tp = size_of(tp_group)
        if activation not in ACTIVATIONS:
            raise MoEError(f"activation={activation!r}: must be one of {ACTIVATIONS}")
        if ffn_hidden < 1 or ffn_hidden % tp:
            raise MoEError(
                f"shared_ffn_hidden={ffn_hidden}: must be a positive multiple of the tensor-parallel size {tp}"
            )
        if sequence_parallel and tp_group is None:
            raise MoEError("sequence_parallel=True: needs a tp_group (the group the sequence is split over)")
        self.activation, self.tp_group, self.sequence_parallel = activation, tp_group, sequence_parallel
        self.ffn_hidden = ffn_hidden
        f_out = (2 if activation == "swiglu" else 1) * ffn_hidden
        kind = {"dtype": dtype, "device": device}
        if tp_group is None:
            self.fc1 = _Linear(torch.zeros(f_out, hidden), **kind)
            self.fc2 = _Linear(torch.zeros(hidden, ffn_hidden), **kind)
        else:  # zero-stride zeros: the parallel layers allocate only their slices
            sp = {"group": tp_group, "bias": False, "sequence_parallel": sequence_parallel, **kind}
            whole1, whole2 = torch.zeros(()).expand(f_out, hidden), torch.zeros(()).expand(hidden, ffn_hidden)
            self.fc1 = ColumnParallelLinear(hidden, f_out, full_weight=whole1, **sp)
            self.fc2 = RowParallelLinear(ffn_hidden, hidden, input_is_parallel=True, full_weight=whole2, **sp)
        self.gate_weight = None
        if gate:
            gate_dtype = dtype or torch.get_default_dtype()
            self.gate_weight = nn.Parameter(torch.zeros(1, hidden, dtype=gate_dtype, device=device))
            if sequence_parallel:  # used on a sequence shard: its gradient is a partial sum over TP
                mark_sequence_parallel(self.gate_weight)
        if draw:
            self.draw(seed)

    def draw(self, seed: int | None) -> None:
        """Set the weights to the values drawn from ``seed`` (the default generator when ``None``; see the
        module), streamed: this rank's slices only, holding at most one chunk beside them."""
        halves, rank, f = (2 if self.activation == "swiglu" else 1), rank_in(self.tp_group), self.ffn_hidden
        fc1, fc2 = self.fc1.weight, self.fc2.weight
        generator = tp_init.generator_for(seed)
        with torch.no_grad():  # rank r's rows of fc1: its gate slice, then its up slice; its columns of fc2
            stream_linear((halves * f, fc1.size(1)), generator, keep_parts(fc1, halves, f, rank))
            stream_linear((fc2.size(0), self.ffn_hidden), generator, keep_columns(fc2, rank * fc2.size(1)))
            if self.gate_weight is not None:
                stream_linear(tuple(self.gate_weight.shape), generator, keep_rows(self.gate_weight, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., hidden]`` (``[seq/tp, batch, hidden]`` under sequence parallelism); same shape out."""
        h = self.fc1(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, -1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        out = self.fc2(h)
        if self.gate_weight is not None:
            out = out * torch.sigmoid(F.linear(x, self.gate_weight))
        return out


class _Linear(nn.Module):
    """A bias-free linear layer on a given full weight (``nn.Linear`` would draw its own first)."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype | None, device: torch.device | str | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.to(dtype=dtype or torch.get_default_dtype(), device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

"""The Mamba-2 sequence mixing in plain PyTorch: the causal depthwise convolution and the chunked SSD scan.

The state-space recurrence per head is ``h_t = exp(dt_t * A) h_t-1 + dt_t * x_t B_t^T`` and
``y_t = h_t C_t`` (state ``[head_dim, state]``). The scan (state-space duality) cuts the sequence into
chunks: within a chunk the output is a masked quadratic form (like causal attention with a decaying
mask), and only the state at each chunk's end is carried to the next chunk, so time and memory are
linear in the sequence length. Both functions take and return the state they continue from, which is
how the inference cache steps them token by token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, history: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution of ``x`` ``[batch, channels, seq]`` with ``weight`` ``[channels, width]``
    after ``history`` (the ``width - 1`` inputs before ``x``, zeros when ``None``). Returns the output
    ``[batch, channels, seq]`` and the last ``width - 1`` inputs (the next call's history)."""
    width = weight.size(1)
    if history is None:
        history = x.new_zeros(x.size(0), x.size(1), width - 1)
    full = torch.cat([history.to(x.dtype), x], dim=-1)
    out = F.conv1d(full, weight.unsqueeze(1), bias, groups=x.size(1))
    return out, full[..., full.size(-1) - (width - 1) :]


def segment_sums(a: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = a[..., j+1] + ... + a[..., i]`` for ``j <= i`` (0 on the diagonal) and ``-inf`` above
    it, from ``a`` ``[..., q]``. Summed directly (a masked cumulative sum), not as a difference of two
    running sums, which would lose precision once the running sums grow large."""
    q = a.size(-1)
    grid = a.unsqueeze(-1).expand(*a.shape, q)  # [..., i, j] = a_i
    lower = torch.ones(q, q, dtype=torch.bool, device=a.device).tril()
    sums = grid.masked_fill(~lower.tril(-1), 0.0).cumsum(dim=-2)
    return sums.masked_fill(~lower, float("-inf"))


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk: int,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSM over a sequence. ``x`` ``[batch, seq, heads, head_dim]``; ``dt`` ``[batch, seq, heads]`` (the
    positive step sizes); ``A`` ``[heads]`` (negative); ``B``, ``C`` ``[batch, seq, heads, state]``; ``state``
    ``[batch, heads, head_dim, state]`` before the first position (zeros when ``None``). Returns ``y`` like
    ``x`` (without the ``D`` skip) and the state after the last position. Computed in float32."""
    dtype, (batch, seq, heads, dim), n = x.dtype, x.shape, B.size(-1)
    x, dt, B, C = x.float(), dt.float(), B.float(), C.float()
    pad = -seq % chunk
    xdt, a = x * dt.unsqueeze(-1), dt * A.float()  # padding positions: no input, decay exp(0) = 1
    xdt, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (xdt, B, C))
    a = F.pad(a, (0, 0, 0, pad))
    chunks = (seq + pad) // chunk
    xdt = xdt.view(batch, chunks, chunk, heads, dim)
    B, C = (t.view(batch, chunks, chunk, heads, n) for t in (B, C))
    a = a.view(batch, chunks, chunk, heads).permute(0, 3, 1, 2)  # [batch, heads, chunks, chunk]
    decay_in = torch.exp(segment_sums(a))  # [b, h, c, i, j]: decay from position j to position i
    scores = torch.einsum("bcihn,bcjhn->bhcij", C, B) * decay_in
    y = torch.einsum("bhcij,bcjhp->bcihp", scores, xdt)

    cum = a.cumsum(dim=-1)
    to_end = torch.exp(cum[..., -1:] - cum)  # decay from each position to its chunk's end
    ends = torch.einsum("bcjhn,bhcj,bcjhp->bchpn", B, to_end, xdt)  # each chunk's own contribution
    through = torch.exp(cum[..., -1])  # [b, h, c]: decay across a whole chunk
    running = x.new_zeros(batch, heads, dim, n) if state is None else state.float()
    starts = []
    for c in range(chunks):
        starts.append(running)
        running = running * through[:, :, c, None, None] + ends[:, c]
    starts = torch.stack(starts, dim=1)  # [b, c, h, p, n]: the state before each chunk
    y = y + torch.einsum("bcihn,bchpn,bhci->bcihp", C, starts, torch.exp(cum))
    return y.reshape(batch, chunks * chunk, heads, dim)[:, :seq].to(dtype), running

"""The per-step masking rule of ring attention, checked exhaustively against the global causal mask.

For every CP size up to 8, both placements and both mask kinds: the pairs (query, key) that rank ``r``
computes at the step holding rank ``s``'s keys must be exactly the pairs the full-sequence mask allows
between the two ranks' positions. No processes; positions stand in for tokens.
"""

import pytest
import torch

from cp_ring.blocks import block_for

CHUNK = 3  # positions per chunk: odd, so that off-by-one slicing shows


def positions(rank, cp, zigzag):
    """Global positions rank ``rank`` holds (its part of the sequence, in order)."""
    if not zigzag:
        return torch.arange(rank * 2 * CHUNK, (rank + 1) * 2 * CHUNK)
    first, second = rank, 2 * cp - 1 - rank
    return torch.cat(
        [torch.arange(first * CHUNK, (first + 1) * CHUNK), torch.arange(second * CHUNK, (second + 1) * CHUNK)]
    )


def computed(rank, source, cp, causal, zigzag):
    local = 2 * CHUNK
    pairs = torch.zeros(local, local, dtype=torch.bool)
    block = block_for(rank, source, cp, local, causal=causal, zigzag=zigzag)
    if block is not None:
        rows = torch.arange(local)[block.q]
        cols = torch.arange(local)[block.kv]
        allowed = torch.ones(len(rows), len(cols), dtype=torch.bool)
        if block.causal:
            assert len(rows) == len(cols), "causal blocks must be square"
            allowed = allowed.tril()
        pairs[rows.unsqueeze(1), cols.unsqueeze(0)] = allowed
    return pairs


@pytest.mark.parametrize("zigzag", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("cp", range(1, 9))
def test_blocks_cover_exactly_the_global_mask(cp, causal, zigzag):
    for rank in range(cp):
        for source in range(cp):
            q_pos, k_pos = positions(rank, cp, zigzag), positions(source, cp, zigzag)
            expected = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1) if causal else torch.ones(len(q_pos), len(k_pos)) > 0
            assert torch.equal(computed(rank, source, cp, causal, zigzag), expected), (rank, source)


@pytest.mark.parametrize("cp", range(2, 9))
def test_zigzag_gives_every_rank_the_same_causal_work(cp):
    """Work counted as score entries computed (a causal diagonal block costs the full square)."""

    def work(rank):
        total = 0
        for source in range(cp):
            block = block_for(rank, source, cp, 2 * CHUNK, causal=True, zigzag=True)
            total += len(range(2 * CHUNK)[block.q]) * len(range(2 * CHUNK)[block.kv])
        return total

    assert len({work(rank) for rank in range(cp)}) == 1
    contiguous = [
        sum(block_for(r, s, cp, 2, causal=True, zigzag=False) is not None for s in range(cp)) for r in range(cp)
    ]
    assert contiguous == list(range(1, cp + 1))  # the imbalance zigzag removes

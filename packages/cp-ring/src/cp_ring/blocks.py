"""Which part of a ring step's attention block is computed: the masking rule, as pure data.

At ring step ``t`` CP rank ``r`` holds the key/value part of rank ``s = (r - t) mod cp``. With causal
attention the global rule "query position ``i`` sees key position ``j <= i``" restricted to the two parts
is always one of four shapes, so no step needs an element-wise mask except the diagonal one:

- not causal: all local queries against all keys of the block;
- ``s == r`` (the diagonal step): the local causal mask (a rank's positions increase along its part in
  both placements, so the ordinary lower-triangular mask is exact);
- contiguous, ``s < r``: every query sees every key; ``s > r``: nothing (the step is skipped);
- zigzag (rank ``r`` holds chunks ``r`` and ``2cp-1-r``, ``c`` positions each), ``s < r``: both query
  chunks come after chunk ``s`` and before chunk ``2cp-1-s``, so all queries see the first half of
  the block's keys and none of the second half; ``s > r``: chunk ``r`` comes before both of ``s``'s
  chunks and chunk ``2cp-1-r`` after both, so the second half of the queries sees every key and the
  first half sees none.

Under zigzag every non-diagonal step therefore costs exactly half a full block on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Block:
    """Local query rows ``q`` against key/value rows ``kv`` of the travelling block, causal or full."""

    q: slice
    kv: slice
    causal: bool


def block_for(rank: int, source: int, cp: int, local_len: int, *, causal: bool, zigzag: bool) -> Block | None:
    """The block rank ``rank`` computes against the keys/values of rank ``source``; ``None``: skip it."""
    every = slice(0, local_len)
    if not causal:
        return Block(every, every, False)
    if source == rank:
        return Block(every, every, True)
    if not zigzag:
        return Block(every, every, False) if source < rank else None
    half = local_len // 2
    if source < rank:
        return Block(every, slice(0, half), False)
    return Block(slice(half, local_len), every, False)

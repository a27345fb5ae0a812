"""The fixed-size check that lets every rank plan a save alone: one sum of a few integers over the ranks.

With the holders of every piece given by the layout (``ckpt.save(replicas=...)``), a rank plans from its
own leaves (:func:`ckpt.plan.local_plan`). That is right only if the ranks agree, which one all-reduce of
a short vector establishes, whatever the world size:

- errors: the count of ranks with a problem (bad leaves; on rank 0 an existing path, a bad ``keep``);
- the token naming the temporary directory, contributed by rank 0 alone (a broadcast by summation);
- values: the sums of ``h`` and ``h**2`` of a hash ``h`` of each rank's JSON values, equal on every
  rank exactly when ``world * sum(h**2) == sum(h)**2``;
- holders: for every piece a rank holds with holders ``G`` (``|G| > 1``), every holder adds a hash
  of ``(piece, G)`` and the piece's writer subtracts ``|G|`` times it (modulo a prime). The sum is zero
  when every holder of ``G`` claims the piece with the same ``G``; a disagreement leaves it non-zero
  with probability ``1 - 2**-124`` over four lanes.

Every rank sees the same sum, so all take the local plan or all fall back to the exchange together.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from .plan import SetKey, assign, canonical, piece_bytes, piece_of

LANES = 4
PRIME = 2**31 - 1
VALUE_BITS = 20
TOKEN = 12


def _lanes(text: str) -> list[int]:
    digest = hashlib.blake2b(text.encode(), digest_size=8 * LANES).digest()
    return [int.from_bytes(digest[8 * i : 8 * i + 8], "little") for i in range(LANES)]


def vector(doc: dict, holders: Mapping[str, tuple[int, ...]], rank: int, token: str | None, errors: int) -> list[int]:
    """This rank's contribution to the agreement sum (``token`` on rank 0 only)."""
    values = [h % (1 << VALUE_BITS) for h in _lanes(json.dumps(doc["values"], sort_keys=True, allow_nan=True))]
    replicas = [0] * LANES
    holders = canonical(holders)
    keys: dict[int, SetKey] = {}
    by_set: dict[SetKey, list] = {}
    for name, meta in doc["tensors"].items():
        piece = piece_of(name, meta)
        ranks = holders.get(name, ())
        if piece is not None and len(ranks) > 1:
            key = keys.setdefault(id(ranks), SetKey(ranks))
            by_set.setdefault(key, []).append((piece, piece_bytes(piece, meta["dtype"])))
    sets: dict[int, str] = {}  # once per holder set: a rank holds pieces of a few sets
    for key in by_set:
        sets[id(key.ranks)] = hashlib.blake2b(json.dumps(key.ranks).encode(), digest_size=16).hexdigest()
    for piece, writer in assign(by_set).items():
        meta = doc["tensors"][piece[0]]
        ranks = holders[piece[0]]
        key = json.dumps([piece, meta["dtype"], meta["global_shape"], sets[id(ranks)]])
        weight = 1 - (len(ranks) if writer == rank else 0)
        replicas = [(acc + weight * h) % PRIME for acc, h in zip(replicas, _lanes(key))]
    chars = [ord(c) for c in token] if token is not None else [0] * TOKEN
    return [errors, *chars, *values, *(v * v for v in values), *replicas]


def verdict(total: list[int], world: int) -> tuple[bool, str]:
    """Whether every rank may use its local plan, and rank 0's token, from the summed vectors."""
    errors, chars = total[0], total[1 : 1 + TOKEN]
    rest = total[1 + TOKEN :]
    sums, squares, replicas = rest[:LANES], rest[LANES : 2 * LANES], rest[2 * LANES :]
    same_values = all(world * q == s * s for s, q in zip(sums, squares))
    agree = errors == 0 and same_values and all(v % PRIME == 0 for v in replicas)
    return agree, "".join(chr(c) for c in chars)


def holders_of(replicas: Any, name: str, shard: Any, rank: int, size: int, checked: dict) -> tuple[int, ...]:
    """``replicas(name, shard)`` as sorted ranks; it must hold ``rank`` and lie in the group. A sequence
    returned again (the same object, kept alive in ``checked``) is not sorted and checked again."""
    given = replicas(name, shard)
    if id(given) in checked and checked[id(given)][0] is given:
        return checked[id(given)][1]
    ranks = tuple(sorted({int(r) for r in given}))
    checked[id(given)] = (given, ranks)
    if rank not in ranks or ranks[0] < 0 or ranks[-1] >= size:
        raise ValueError(f"{name!r}: replicas {list(ranks)} must include this rank {rank} and lie in [0, {size})")
    return ranks


def first_disagreement(docs: list[dict]) -> str | None:
    """Where the replicas each rank gave differ from the ranks that hold identical pieces (for a warning)."""
    found: dict[tuple, list[int]] = {}
    for r, d in enumerate(docs):
        for name, meta in d["tensors"].items():
            piece = piece_of(name, meta)
            if piece is not None:
                found.setdefault(piece, []).append(r)
    for r, d in enumerate(docs):
        for name, ranks in sorted(d.get("holders", {}).items()):
            piece = piece_of(name, d["tensors"][name])
            if piece is not None and list(ranks) != found[piece]:
                return f"rank {r} gave {name!r} the replicas {ranks}, but ranks {found[piece]} hold that piece"
    return None

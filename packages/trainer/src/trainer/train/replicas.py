"""Which ranks hold each checkpoint piece, from the layout alone, so that ``ckpt.save`` plans locally.

A piece of the run's state (:func:`trainer.train.checkpoint.run_state`) is identical on the ranks of
this pipeline stage that agree with this rank on every axis the piece is split along:

- dense tensors: split along ``tp`` when the piece is smaller than the tensor; a rectangle (the model,
  and AdamW's moments without ZeRO) is the same on every ``dp`` and ``cp`` rank, a ZeRO/FSDP flat range
  differs there, except across HSDP's replicate group (``parallel.dp_shard``), whose ranks hold the same;
- expert tensors (``.experts.``): split along ``ep`` and, when their inner dimensions are smaller, along
  ``etp``; a rectangle is the same on every ``edp`` rank, a flat range differs there;
- scalars (AdamW's ``step``) are the same on every rank of the stage;
- the tied embedding's copy on the last stage holds what the first stage holds.

``ckpt`` checks the claim with a fixed-size sum and plans by exchange (with a warning) if it is wrong,
so a mistake here costs time, never a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pstate import Layout, Shard

TIED = "embedding.weight"


def replicas(layout: Layout, rank: int, tied_embeddings: bool) -> Callable[[str, Shard], Sequence[int]]:
    """``replicas(leaf name, shard)`` for ``ckpt.save`` on ``rank`` (global ranks: the world saves)."""
    cache: dict[tuple, list[int]] = {}

    def holders(name: str, shard: Shard) -> list[int]:
        expert = ".experts." in name
        flat = shard.flat_range is not None
        if not shard.global_shape:
            axes = ("tp", "cp", "dp")
        elif expert:
            etp_split = tuple(shard.shape[1:]) != tuple(shard.global_shape[1:])
            axes = (() if etp_split else ("etp",)) + (() if flat else ("edp",))
        else:
            tp_split = tuple(shard.shape) != tuple(shard.global_shape)
            axes = (() if tp_split else ("tp",)) + (() if flat else ("cp", "dp"))
        tied = tied_embeddings and layout.config.pp > 1 and name.split("/")[1:2] == [TIED]
        hsdp = flat and not expert and layout.dp_replicate > 1  # the same flat range on every replica
        key = (axes, tied, hsdp)
        if key not in cache:
            group = layout.group_of(rank, "-".join(axes)) if axes else [rank]
            if hsdp:
                group = [
                    p
                    for m in layout.hsdp_group_of(rank)[1]
                    for p in (layout.group_of(m, "-".join(axes)) if axes else [m])
                ]
            if tied:  # the same ranks on the first and the last stage
                group = [p for m in group for p in _ends(layout.group_of(m, "pp"))]
            cache[key] = sorted(group)
        return cache[key]

    return holders


def _ends(pp_group: list[int]) -> list[int]:
    return [pp_group[0], pp_group[-1]]

"""Simulated per-rank descriptions of a TP/PP/DP (optionally ZeRO) transformer's checkpoint state, with
the holders the layout gives each leaf: what ``describe`` would return on every rank, without processes."""

from __future__ import annotations

from pstate import ParallelConfig, layout


def rank_doc(lay, rank: int, *, layers: int, hidden: int, ffn: int, vocab: int, zero: bool) -> tuple[dict, dict]:
    """``(describe document, holders by leaf name)`` of ``rank``."""
    c = lay.coords(rank)
    tp, pp, dp = lay.config.tp, lay.config.pp, lay.dp
    t, p, d = c["tp"], c["pp"], c["dp"]
    tensors: list[tuple[str, tuple, tuple, tuple]] = []  # (name, global shape, offsets, shape)
    if p == 0:
        tensors.append(("embedding", (vocab, hidden), (t * vocab // tp, 0), (vocab // tp, hidden)))
    if p == pp - 1:
        tensors.append(("head", (vocab, hidden), (t * vocab // tp, 0), (vocab // tp, hidden)))
        tensors.append(("final_norm", (hidden,), (0,), (hidden,)))
    per = layers // pp
    for i in range(p * per, (p + 1) * per):
        tensors += [
            (f"layers.{i}.qkv", (3 * hidden, hidden), (t * 3 * hidden // tp, 0), (3 * hidden // tp, hidden)),
            (f"layers.{i}.proj", (hidden, hidden), (0, t * hidden // tp), (hidden, hidden // tp)),
            (f"layers.{i}.fc1", (ffn, hidden), (t * ffn // tp, 0), (ffn // tp, hidden)),
            (f"layers.{i}.fc2", (hidden, ffn), (0, t * ffn // tp), (hidden, ffn // tp)),
            (f"layers.{i}.norm1", (hidden,), (0,), (hidden,)),
            (f"layers.{i}.norm2", (hidden,), (0,), (hidden,)),
        ]
    docs: dict = {"tensors": {}, "rank_tensors": {"rng": {"dtype": "uint8", "shape": [816]}}, "errors": []}
    docs["values"] = {"progress/step": 7, "config": "model = 'x'"}
    docs["rank_values"] = {"progress/data": {"consumed": rank}}
    holders: dict[str, tuple[int, ...]] = {}
    groups: dict[str, tuple[int, ...]] = {}

    def group(axes: str) -> tuple[int, ...]:  # one object per group, as a caller caches them
        if axes not in groups:
            groups[axes] = tuple(lay.group_of(rank, axes))
        return groups[axes]

    stage = group("tp-cp-dp")
    for name, gshape, offsets, shape in tensors:
        split = shape != gshape
        rect = {"dtype": "float32", "global_shape": list(gshape), "offsets": list(offsets), "shape": list(shape)}
        docs["tensors"][f"model/{name}"] = {**rect, "flat_range": None}
        holders[f"model/{name}"] = group("cp-dp" if split else "tp-cp-dp")
        numel = 1
        for n in shape:
            numel *= n
        for moment in ("exp_avg", "exp_avg_sq"):
            key = f"optimizer/{name}/{moment}"
            if zero:
                flat = [d * numel // dp, (d + 1) * numel // dp]
                docs["tensors"][key] = {**rect, "flat_range": flat}
                holders[key] = (rank,) if split else group("tp")
            else:
                docs["tensors"][key] = {**rect, "flat_range": None}
                holders[key] = holders[f"model/{name}"]
        key = f"optimizer/{name}/step"
        docs["tensors"][key] = {"dtype": "float32", "global_shape": [], "offsets": [], "shape": [], "flat_range": None}
        holders[key] = stage
    return docs, holders


def simulate(tp: int, pp: int, world: int, *, zero: bool, layers: int = 4, hidden: int = 16, ffn: int = 32,
             vocab: int = 64) -> list[tuple[dict, dict]]:  # fmt: skip
    lay = layout(ParallelConfig(tp=tp, pp=pp), world)
    return [rank_doc(lay, r, layers=layers, hidden=hidden, ffn=ffn, vocab=vocab, zero=zero) for r in range(world)]

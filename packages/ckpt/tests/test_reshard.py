"""Save at one parallel layout, load at another: every loaded piece equals the global reference.

The state is built in the test from seeded global tensors, cut the way each parallelism cuts it: TP
rectangles on either dimension, ZeRO flat ranges of a flattened tensor (uneven, some empty), ZeRO
inside TP rectangles, pipeline stages holding layers by global number, expert-parallel ranks holding
experts by global number. Loading only moves bytes, so the comparison is exact (``torch.equal``).
"""

import zlib

import pytest
import torch
import torch.distributed as dist

import ckpt
from pstate import Shard

SHAPE = (8, 12)  # both dimensions divide by 1, 2 and 4; 96 elements
LAYERS, EXPERTS = 4, 4


def reference(name, shape=SHAPE, dtype=torch.float32):
    """The global value of tensor ``name``: the single-process reference every layout slices."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(shape, generator=gen).to(dtype)


def rect(name, dim, rank, parts, fill):
    g = reference(name)
    if dim is None:
        return g if fill else torch.zeros_like(g)
    piece = g.chunk(parts, dim)[rank].clone()
    offsets = tuple(rank * piece.shape[dim] if d == dim else 0 for d in range(g.dim()))
    return Shard(piece if fill else torch.zeros_like(piece), g.shape, offsets)


def flat(whole, rank, parts, fill):
    """The ZeRO piece of rank ``rank`` of ``parts``: a flat range of ``whole``'s rectangle, ceil-sized."""
    size = whole.data.numel()
    step = -(-size // parts)
    start, stop = min(rank * step, size), min((rank + 1) * step, size)
    data = whole.data.flatten()[start:stop].clone()
    data = data if fill else torch.zeros_like(data)
    local = Shard(data, whole.shape, (0,) * len(whole.shape), shape=whole.shape, flat_range=(start, stop))
    return local.within(whole.global_shape, whole.offsets)


def as_shard(t):
    return t if isinstance(t, Shard) else Shard(t, tuple(t.shape), (0,) * t.dim())


def state_for(layout, rank, fill):
    """This rank's state under ``layout``; zeros instead of values unless ``fill``."""
    kind, p = layout[0], layout[1:]
    if kind == "tp":
        tp, dim = p
        other = None if dim is None else 1 - dim
        return {
            "w": rect("w", dim, rank, tp, fill),
            "w_other": rect("w_other", other, rank, tp, fill),
            "norm": rect("norm", None, rank, tp, fill),
            "step": 3,
        }
    if kind == "zero":
        (dp,) = p
        full, tiny = as_shard(reference("w")), as_shard(reference("tiny", (3,)))
        return {
            "opt": {"w": {"exp_avg": flat(full, rank, dp, fill)}, "tiny": flat(tiny, rank, dp, fill)},
            "model": {"w": rect("w", None, rank, 1, fill)},
            "step": 5,
        }
    if kind == "zero_tp":
        tp, dp, dim = p
        tp_rank, dp_rank = rank % tp, rank // tp
        piece = rect("w", dim, tp_rank, tp, True)
        return {"opt": {"w": flat(as_shard(piece), dp_rank, dp, fill)}}
    if kind == "pp":
        (pp,) = p
        per = LAYERS // pp
        return {"layers": {i: {"w": rect(f"layer{i}", None, 0, 1, fill)} for i in range(rank * per, (rank + 1) * per)}}
    if kind == "ep":
        (ep,) = p
        per = EXPERTS // ep
        return {"experts": {e: rect(f"expert{e}", None, 0, 1, fill) for e in range(rank * per, (rank + 1) * per)}}
    raise ValueError(kind)


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def save_layout(path, layout):
    ckpt.save(state_for(layout, rank(), True), path, layout={"name": list(layout)})


def load_and_compare(path, layout):
    """Load into zeros at ``layout``; compare every leaf with the reference; the elements compared."""
    got = ckpt.load(state_for(layout, rank(), False), path)
    want = state_for(layout, rank(), True)
    flat_got, flat_want = _leaves(got), _leaves(want)
    assert flat_got.keys() == flat_want.keys()
    count = 0
    for key, value in flat_got.items():
        if isinstance(value, (Shard, torch.Tensor)):
            a, b = as_shard(value).data, as_shard(flat_want[key]).data
            assert torch.equal(a, b), key
            count += a.numel()
        else:
            assert value == flat_want[key], key
    return count


def _leaves(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def world(layout):
    kind, p = layout[0], layout[1:]
    return p[0] * p[1] if kind == "zero_tp" else p[0]


CASES = [
    (("tp", 2, 0), ("tp", 1, 0)),
    (("tp", 2, 1), ("tp", 1, 1)),
    (("tp", 1, 0), ("tp", 4, 0)),
    (("tp", 1, 1), ("tp", 4, 1)),
    (("tp", 2, 0), ("tp", 4, 0)),
    (("tp", 2, 1), ("tp", 4, 1)),
    (("tp", 2, 0), ("tp", 4, 1)),
    (("zero", 2), ("zero", 4)),
    (("zero", 4), ("zero", 1)),
    (("zero", 4), ("zero", 5)),  # uneven ranges: 20 * 4 + 16 elements
    (("zero_tp", 2, 2, 0), ("zero_tp", 1, 4, 0)),
    (("zero_tp", 2, 2, 1), ("zero_tp", 2, 3, 0)),
    (("zero_tp", 1, 2, 0), ("zero_tp", 2, 2, 1)),
    (("pp", 2), ("pp", 4)),
    (("pp", 4), ("pp", 1)),
    (("ep", 2), ("ep", 1)),
    (("ep", 1), ("ep", 4)),
]


@pytest.mark.parametrize(("saved", "loaded"), CASES, ids=lambda c: "-".join(map(str, c)))
def test_load_into_another_layout(run_ranks, tmp_path, saved, loaded):
    path = tmp_path / "ckpt"
    run_ranks(world(saved), save_layout, str(path), saved)
    counts = run_ranks(world(loaded), load_and_compare, str(path), loaded)
    assert all(c > 0 for c in counts)


def test_a_layout_round_trip_needs_no_process_group(tmp_path):
    """``group=None`` without torch.distributed is one process: the resharding maths is the same."""
    path = tmp_path / "ckpt"
    save_layout(path, ("zero", 1))
    assert load_and_compare(path, ("zero", 1)) == 2 * 96 + 3

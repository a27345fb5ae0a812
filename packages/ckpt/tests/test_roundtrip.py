"""Round trips at the same layout are bitwise equal, and replicated pieces are written once, spread.

Every dtype is compared with ``torch.equal`` on the bytes (bf16 and ints included): a save/load that
only moves data must not change a bit.
"""

import json

import pytest
import torch
import torch.distributed as dist

import ckpt
from pstate import Shard
from pstate.device import default_device


def full_state(rank, world, fill):
    """Sharded fp32/bf16/int/bool tensors, an empty piece, replicated tensors, values and RNG state."""
    gen = torch.Generator().manual_seed(1234)
    w = torch.randn(world * 2, 3, generator=gen)
    emb = torch.randn(4, world * 3, generator=gen).to(torch.bfloat16)
    ids = torch.randint(-(2**40), 2**40, (world, 5), generator=gen)
    mask = torch.rand(world, 2, generator=gen) > 0.5
    norm = torch.randn(7, generator=gen)
    scalar = torch.tensor(2.5, dtype=torch.float64)
    rng = torch.get_rng_state() if fill else torch.zeros_like(torch.get_rng_state())

    def keep(t):
        return t.clone() if fill else torch.zeros_like(t)

    # rank 0 holds the empty ZeRO piece of a 3-element tensor when world > 3
    size = 3
    step = -(-size // world)
    start, stop = min(rank * step, size), min((rank + 1) * step, size)
    tiny = torch.arange(3.0)[start:stop]
    return {
        "model": {
            "w": Shard(keep(w[2 * rank : 2 * rank + 2]), tuple(w.shape), (2 * rank, 0)),
            "emb": Shard(keep(emb[:, 3 * rank : 3 * rank + 3]), tuple(emb.shape), (0, 3 * rank)),
            "norm": keep(norm),
            "scalar": keep(scalar),
        },
        "ids": Shard(keep(ids[rank : rank + 1]), tuple(ids.shape), (rank, 0)),
        "mask": Shard(keep(mask[rank : rank + 1]), tuple(mask.shape), (rank, 0)),
        "tiny": Shard(keep(tiny), (3,), (0,), shape=(3,), flat_range=(start, stop)),
        "rng": ckpt.PerRank(rng),
        "data_position": ckpt.PerRank(100 * rank if fill else -1),
        "step": 17 if fill else 0,
        "config": {"lr": 1e-3, "betas": [0.9, 0.95], "name": "tiny", "warm": True, "clip": None} if fill else None,
    }


def leaves(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k != "config":
            out.update(leaves(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def round_trip(path):
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)  # a different RNG state per rank
    saved = full_state(rank, world, True)
    ckpt.save(saved, path, group=dist.group.WORLD, layout={"dp": world})
    got = ckpt.load(full_state(rank, world, False), path, group=dist.group.WORLD)
    want, have = leaves(saved), leaves(got)
    for key, value in want.items():
        a, b = have[key], value
        if isinstance(b, ckpt.PerRank):
            a, b = a.value, b.value
        if isinstance(b, Shard):
            a, b = a.data, b.data
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), key
        else:
            assert a == b, key
    return True


def test_same_layout_round_trip_is_bitwise(run_ranks, tmp_path):
    assert run_ranks(4, round_trip, str(tmp_path / "c")) == [True] * 4


def test_same_layout_round_trip_in_one_process(tmp_path):
    torch.manual_seed(0)
    saved = full_state(0, 1, True)
    ckpt.save(saved, tmp_path / "c")
    got = ckpt.load(full_state(0, 1, False), tmp_path / "c")
    assert torch.equal(got["model"]["w"].data, saved["model"]["w"].data)
    assert got["step"] == 17 and got["config"] == saved["config"]
    assert torch.equal(got["rng"].value, saved["rng"].value)


def replicated_save(path):
    rank = dist.get_rank()
    state = {f"r{i}": torch.full((100 + i,), float(i)) for i in range(8)}  # replicated on every rank
    state["tp"] = Shard(torch.full((4,), float(rank % 2)), (8,), (4 * (rank % 2),))  # same piece on 2 ranks
    ckpt.save(state, path)


def test_replicated_pieces_are_written_once_and_spread(run_ranks, tmp_path):
    path = tmp_path / "c"
    run_ranks(4, replicated_save, str(path))
    index = json.loads((path / "index.json").read_text())
    writers = {key: [p["file"] for p in head["pieces"]] for key, head in index["tensors"].items()}
    assert all(len(files) == 1 for key, files in writers.items() if key.startswith("r"))
    assert len(writers["tp"]) == 2  # two distinct rectangles, each written once
    used = {f for files in writers.values() for f in files}
    assert len(used) == 4, used  # every rank writes a share, not rank 0 alone
    assert sorted(index["files"]) == sorted(used)


@pytest.mark.cuda
def test_gpu_tensors_round_trip_sync_and_async(tmp_path):
    device = default_device()
    w = torch.randn(4, 6, device=device)
    state = {"w": Shard(w, (8, 6), (4, 0)), "b": torch.arange(3, device=device, dtype=torch.bfloat16)}
    ckpt.save(state, tmp_path / "sync")
    with ckpt.AsyncSaver() as saver:
        saver.save(state, tmp_path / "async")
    for name in ("sync", "async"):
        got = {
            "w": Shard(torch.zeros(4, 6, device=device), (8, 6), (4, 0)),
            "b": torch.zeros(3, device=device, dtype=torch.bfloat16),
        }
        ckpt.load(got, tmp_path / name)
        assert got["w"].data.device == device and torch.equal(got["w"].data, w)
        assert torch.equal(got["b"], state["b"])


def test_views_of_one_flat_buffer_save_and_load(tmp_path):
    """ZeRO keeps its shards as views of one flat buffer; safetensors refuses shared memory unless copied."""
    buf = torch.arange(20.0)
    saved = {
        "a": Shard(buf[3:10], (20,), (0,), shape=(20,), flat_range=(3, 10)),
        "b": Shard(buf[10:20].view(2, 5), (4, 5), (2, 0)),
    }
    ckpt.save(saved, tmp_path / "c")
    a, b = torch.zeros(7), torch.zeros(2, 5)
    ckpt.load(
        {"a": Shard(a, (20,), (0,), shape=(20,), flat_range=(3, 10)), "b": Shard(b, (4, 5), (2, 0))}, tmp_path / "c"
    )
    assert torch.equal(a, buf[3:10]) and torch.equal(b, buf[10:20].view(2, 5))

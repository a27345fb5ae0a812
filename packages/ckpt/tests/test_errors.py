"""Bad state, bad checkpoints and bad paths give a ``CheckpointError`` naming the problem, on every
rank, before anything is written or modified."""

import json
import os

import pytest
import torch
import torch.distributed as dist

import ckpt
from pstate import Shard
from pstate.testing import error_messages


def good_state(rank):
    return {"w": Shard(torch.full((2, 4), float(rank)), (4, 4), (2 * rank, 0)), "b": torch.ones(4), "step": 1}


def bad_saves(root):
    rank = dist.get_rank()
    path = os.path.join(root, "c")
    ckpt.save(good_state(rank), os.path.join(root, "existing"))
    shape = {"w": Shard(torch.zeros(2, 4), (4, 4) if rank == 0 else (4, 5), (2 * rank, 0))}
    dtype = {"b": torch.ones(4, dtype=torch.float64 if rank else torch.float32)}
    calls = [
        lambda: ckpt.save(shape, path),
        lambda: ckpt.save(dtype, path),
        lambda: ckpt.save({"step": rank}, path),
        lambda: ckpt.save({"a/b": 1}, path),
        lambda: ckpt.save({"x": object()}, path),
        lambda: ckpt.save({"x": [torch.ones(1)]}, path),
        lambda: ckpt.save(good_state(rank), os.path.join(root, "existing")),
        lambda: ckpt.save(good_state(rank), path, keep=0),
    ]
    messages = error_messages(calls, ckpt.CheckpointError)
    dist.barrier()
    return messages, sorted(os.listdir(root))


def test_bad_saves_are_refused_on_every_rank_before_writing(run_ranks, tmp_path):
    results = run_ranks(2, bad_saves, str(tmp_path))
    expected = [
        ["'w': rank 1 holds float32 of global shape (4, 5)"],
        ["'b': rank 1 holds float64"],
        ["'step': ranks hold different values", "ckpt.PerRank"],
        ["contains '/'"],
        ["'x': the value is not JSON"],
        ["tensors inside a list"],
        ["already exists"],
        ["keep=0"],
    ]
    for messages, listing in results:
        assert listing == ["existing"]  # nothing else was written, not even a temporary directory
        for message, words in zip(messages, expected, strict=True):
            assert message is not None
            for word in words:
                assert word in message, (word, message)


def bad_loads(path):
    rank = dist.get_rank()
    w = torch.full((4, 4), -1.0)
    calls = [
        lambda: ckpt.load({"w": w, "missing": torch.zeros(1)}, path),
        lambda: ckpt.load({"w": w, "b": torch.zeros(4, dtype=torch.float16)}, path),
        lambda: ckpt.load({"w": w, "b": torch.zeros(5)}, path),
        lambda: ckpt.load({"w": Shard(torch.zeros(2, 4), (5, 4), (0, 0))}, path),
        lambda: ckpt.load({"w": w, "partial": Shard(torch.zeros(4) - 1, (8,), (4 * rank,))}, path),
        lambda: ckpt.load({"w": w, "rng": ckpt.PerRank(torch.zeros(3, dtype=torch.uint8))}, path),
        lambda: ckpt.load({"w": w, "b": 1}, path),
    ]
    return error_messages(calls, ckpt.CheckpointError), w


def save_for_bad_loads(path):
    rank = dist.get_rank()
    state = good_state(rank)
    state["partial"] = Shard(torch.ones(2), (8,), (2 * rank,))  # elements 4..7 are never saved
    if rank == 0:
        state["rng"] = ckpt.PerRank(torch.zeros(3, dtype=torch.uint8))
    ckpt.save(state, path)


def test_bad_loads_are_refused_on_every_rank_before_modifying(run_ranks, tmp_path):
    path = str(tmp_path / "c")
    run_ranks(2, save_for_bad_loads, path)
    results = run_ranks(2, bad_loads, path)
    expected = [
        "'missing' is not in the checkpoint",
        "'b': the checkpoint holds float32, the state float16",
        "'b': the checkpoint's global shape is (4,), the state's (5,)",
        "'w': the checkpoint's global shape is (4, 4), the state's (5, 4)",
        "'partial': 4 requested elements of the box at (4,)",
        "'rng': rank 1 saved no tensor",
        "'b' is not in the checkpoint (it is saved as tensor)",
    ]
    for messages, w in results:
        assert torch.equal(w, torch.full((4, 4), -1.0))  # untouched, although w was loadable
        for message, words in zip(messages, expected, strict=True):
            assert message is not None and words in message, (words, message)
            assert "rank 1:" in message  # every rank reports the errors of all ranks


def test_load_of_a_missing_or_incomplete_checkpoint(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match=r"index\.json is missing"):
        ckpt.load({"w": torch.zeros(1)}, tmp_path)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "c"
    ckpt.save({"w": torch.arange(1000.0), "b": torch.ones(3)}, path)
    return path


def data_file(path):
    return path / "rank_00000.safetensors"


def test_a_flipped_byte_is_reported_with_the_file(saved):
    raw = bytearray(data_file(saved).read_bytes())
    raw[-1] ^= 0x01  # a bit of the last element of w
    data_file(saved).write_bytes(bytes(raw))
    w = torch.zeros(1000)
    with pytest.raises(ckpt.CheckpointError, match=r"rank_00000\.safetensors: checksum mismatch"):
        ckpt.load({"w": w}, saved)
    assert not w.any()
    assert ckpt.load({"w": w}, saved, verify=False)["w"][-1] != 999.0  # unverified, the flip goes through


def test_a_missing_file_is_reported_with_the_file(saved):
    data_file(saved).unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"rank_00000\.safetensors: data file is missing"):
        ckpt.load({"w": torch.zeros(1000)}, saved)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "link.safetensors"])
def test_paths_escaping_the_checkpoint_are_refused(saved, tmp_path, name):
    (tmp_path / "outside.safetensors").write_bytes(data_file(saved).read_bytes())
    os.symlink(tmp_path / "outside.safetensors", saved / "link.safetensors")
    index = json.loads((saved / "index.json").read_text())
    index["files"] = {name: index["files"]["rank_00000.safetensors"]}
    for head in index["tensors"].values():
        for piece in head["pieces"]:
            piece["file"] = name
    (saved / "index.json").write_text(json.dumps(index))
    with pytest.raises(ckpt.CheckpointError, match=r"escapes the checkpoint|outside the checkpoint"):
        ckpt.load({"w": torch.zeros(1000)}, saved)
    assert any("outside the checkpoint" in p or "escapes" in p for p in ckpt.verify(saved))

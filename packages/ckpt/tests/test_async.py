"""``AsyncSaver``: ``save`` returns before the write finishes, the result is byte-for-byte a synchronous
save of the state as it was at the call, and a background error surfaces on the next call."""

import json
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import ckpt
from pstate import Shard


def state(rank):
    return {
        "w": Shard(torch.arange(12.0).reshape(2, 6) + 100 * rank, (4, 6), (2 * rank, 0)),
        "b": torch.arange(5, dtype=torch.int32),
        "rng": ckpt.PerRank(torch.full((3,), rank, dtype=torch.uint8)),
        "step": 8,
    }


def overlapped_save(root):
    rank = dist.get_rank()
    s = state(rank)
    release, wrote = threading.Event(), []

    def slow_writer(path):  # holds the background write until the loop has gone on
        assert release.wait(60)
        wrote.append(Path(path).name)

    with ckpt.AsyncSaver() as saver:
        handle = saver.save(s, Path(root) / "async", after_write=slow_writer)
        running = not handle.done() and not (Path(root) / "async").exists()
        s["w"].data.add_(1000)  # training goes on; the checkpoint keeps the values at the call
        release.set()
        handle.wait()
    ckpt.save(state(rank), Path(root) / "sync")
    return running, wrote


def test_async_save_returns_before_the_write_and_matches_a_sync_save(run_ranks, tmp_path):
    results = run_ranks(2, overlapped_save, str(tmp_path))
    assert all(running for running, _ in results)
    assert [wrote for _, wrote in results] == [["rank_00000.safetensors"], ["rank_00001.safetensors"]]
    a, s = tmp_path / "async", tmp_path / "sync"
    names = sorted(p.name for p in a.iterdir())
    assert (
        names == sorted(p.name for p in s.iterdir()) == ["index.json", *(f"rank_0000{r}.safetensors" for r in (0, 1))]
    )
    for name in names[1:]:
        assert (a / name).read_bytes() == (s / name).read_bytes()
    index_a, index_s = (json.loads((p / "index.json").read_text()) for p in (a, s))
    index_a.pop("created"), index_s.pop("created")
    assert index_a == index_s


def failing_then_next(root):
    rank = dist.get_rank()

    def fail(path):
        if rank == 1:
            raise OSError("no space left on device")

    saver = ckpt.AsyncSaver()
    saver.save(state(rank), Path(root) / "first", after_write=fail)
    try:
        saver.save(state(rank), Path(root) / "second")
    except ckpt.CheckpointError as e:
        message = str(e)
    else:
        message = None
    saver.save(state(rank), Path(root) / "third")  # the saver goes on working after reporting
    saver.close()
    return message, sorted(p.name for p in Path(root).iterdir())


def test_a_background_error_surfaces_on_the_next_call(run_ranks, tmp_path):
    for message, listing in run_ranks(2, failing_then_next, str(tmp_path)):
        assert "background save of" in message and "first" in message
        assert "rank 1: OSError: no space left on device" in message
        assert listing == ["third"]  # neither the failed save nor the refused one left anything


def test_wait_raises_the_background_error(tmp_path):
    def fail(path):
        raise RuntimeError("boom")

    with ckpt.AsyncSaver() as saver:
        handle = saver.save({"w": torch.ones(2)}, tmp_path / "c", after_write=fail)
        with pytest.raises(ckpt.CheckpointError, match="rank 0: RuntimeError: boom"):
            handle.wait()

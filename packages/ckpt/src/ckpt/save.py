"""``save`` and ``AsyncSaver``: every rank writes its pieces; rank 0 commits the index last, atomically.

A save has three steps. Plan (collective, in the calling thread): every rank decides what it writes,
refusing bad state before anything is written. Given ``replicas`` (the ranks holding each piece, from
the layout), each rank plans alone and the ranks only sum a short fixed-size vector to agree
(:mod:`ckpt.agree`), so planning costs what the rank holds, not the world size; without it, or when
that check fails, the ranks exchange descriptions (:func:`ckpt.plan.plan`). Write: each rank writes
one safetensors file of its pieces into the temporary directory, fsyncs it and hashes it. Commit
(collective): each rank's file record and part of the index are gathered on rank 0, which assembles
and writes ``index.json``, renames the directory into place and applies retention, then tells every
rank the outcome. ``AsyncSaver`` runs write and commit in a background thread, over its own gloo
group, after copying the pieces it writes to host memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from pstate import Group, Shard

from . import agree, files
from .comm import Comm, comm_for, cpu_comm
from .errors import CheckpointError
from .plan import Plan, assemble, describe, file_name, local_plan, plan
from .tree import Leaf, flatten

AfterWrite = Callable[[Path], None]
Replicas = Callable[[str, Shard], Sequence[int]]


@dataclass
class _Job:
    path: Path
    tmp: Path
    tensors: dict[str, torch.Tensor]
    body: dict
    fragment: dict
    keep: int | None


def save(
    state: dict,
    path: str | os.PathLike,
    *,
    group: Group | None = None,
    layout: Any = None,
    keep: int | None = None,
    after_write: AfterWrite | None = None,
    replicas: Replicas | None = None,
) -> Path:
    """Save ``state`` (see :mod:`ckpt.tree` for its leaves) to the new directory ``path``; collective.

    Args:
        group: the ranks that save together (default: the default group, or a single process).
        layout: recorded in the index for inspection, e.g. a ``pstate.ParallelConfig`` or a dict.
        keep: afterwards keep only the newest ``keep`` complete checkpoints next to ``path``.
        after_write: called with the data file's path once it is durable, in the writing thread
            (a hook for progress reports and for tests that stop a save half-way).
        replicas: ``replicas(name, shard)`` gives the ranks of ``group`` holding a piece identical to
            this rank's piece of tensor leaf ``name`` (this rank included), as the parallel layout says.
            Each rank then plans alone (cost independent of the world size); a disagreement found by the
            fixed-size check falls back to exchanging descriptions, with a warning.

    Returns the checkpoint's path once it is complete on disk.
    """
    comm = comm_for(group)
    job = _prepare(state, path, comm, layout, keep, copy=False, replicas=replicas)
    return _write_and_commit(job, comm, after_write)


class SaveHandle:
    """A save running in the background: ``done()`` polls, ``wait()`` blocks and raises its error."""

    def __init__(self, future: Future, path: Path):
        self._future, self.path = future, path
        self.reported = False  # its error was raised once already: the saver does not raise it again

    def done(self) -> bool:
        return self._future.done()

    def wait(self) -> Path:
        """The checkpoint's path once complete; raises ``CheckpointError`` if the save failed."""
        try:
            return self._result()
        except BaseException:
            self.reported = True
            raise

    def _result(self) -> Path:
        try:
            return self._future.result()
        except CheckpointError as e:
            raise CheckpointError(f"background save of {self.path} failed: {e}") from e
        except Exception as e:
            raise CheckpointError(f"background save of {self.path} failed: {type(e).__name__}: {e}") from e


class AsyncSaver:
    """Saves in the background: ``save`` returns once the state is copied to host memory.

    Construct it on every rank of ``group`` (it creates a gloo group over the same ranks, used by the
    background commit so that it never competes with the training loop's collectives). The next
    ``save`` waits for the previous one and raises its error, if any; so do ``wait`` and ``close``.
    """

    def __init__(self, group: Group | None = None):
        self._comm = cpu_comm(comm_for(group))
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt-writer")
        self._pending: SaveHandle | None = None

    def save(
        self,
        state: dict,
        path: str | os.PathLike,
        *,
        layout: Any = None,
        keep: int | None = None,
        after_write: AfterWrite | None = None,
        replicas: Replicas | None = None,
    ) -> SaveHandle:
        """Like :func:`ckpt.save` (collective), but the writing and the index happen after this returns."""
        self.wait()
        job = _prepare(state, path, self._comm, layout, keep, copy=True, replicas=replicas)
        self._pending = SaveHandle(self._pool.submit(_write_and_commit, job, self._comm, after_write), job.path)
        return self._pending

    def wait(self) -> Path | None:
        """Wait for the save in flight, if any; raise its error."""
        pending, self._pending = self._pending, None
        return None if pending is None or pending.reported else pending.wait()

    def close(self) -> None:
        """Wait for the last save, then stop the writer thread and free the group."""
        try:
            self.wait()
        finally:
            self._pool.shutdown()
            if self._comm.group is not None and dist.is_initialized():
                dist.destroy_process_group(self._comm.group)
                self._comm = Comm(None, self._comm.rank, self._comm.size)

    def __enter__(self) -> AsyncSaver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _prepare(
    state: dict,
    path: str | os.PathLike,
    comm: Comm,
    layout: Any,
    keep: int | None,
    copy: bool,
    replicas: Replicas | None = None,
) -> _Job:
    """Plan (collectively); return this rank's pieces (host copies when ``copy``) and index fragment."""
    path = Path(path).absolute()
    leaves: dict[str, Leaf] = {}
    doc: dict[str, Any] = {"tensors": {}, "rank_tensors": {}, "values": {}, "rank_values": {}, "errors": []}
    try:
        leaves = flatten(state)
        doc = describe(leaves)
    except CheckpointError as e:
        doc["errors"].append(str(e))
    token = None
    if comm.rank == 0:
        token = files.new_token()
        if path.exists():
            doc["errors"].append(f"{path} already exists; choose a new directory for each checkpoint")
        if keep is not None and (not isinstance(keep, int) or keep < 1):
            doc["errors"].append(f"keep={keep!r} must be a positive int")
        try:
            layout = _json_layout(layout)
        except TypeError as e:
            doc["errors"].append(str(e))
    p, token = _plan(doc, leaves, comm, token, replicas)
    if p.errors:
        raise CheckpointError(f"cannot save {path}: " + "; ".join(p.errors))
    tensors: dict[str, torch.Tensor] = {}
    for leaf_name, stored_name in p.writes:
        leaf = leaves[leaf_name]
        data = leaf.obj.value if leaf.kind == "rank_tensor" else leaf.shard().data
        tensors[stored_name] = _to_host(data, copy)
    body = {
        "format": "ckpt",
        "version": 1,
        "created": time.time(),
        "world_size": comm.size,
        "layout": layout if comm.rank == 0 else None,
    }
    return _Job(path, files.temporary_dir(path, token), _unshare(tensors), body, p.fragment, keep)


def _plan(
    doc: dict, leaves: dict[str, Leaf], comm: Comm, token: str | None, replicas: Replicas | None
) -> tuple[Plan, str]:
    """This rank's plan and the save's token: planned alone when ``replicas`` is given and every rank
    agrees (one fixed-size sum), else from every rank's description."""
    if replicas is not None:
        holders: dict[str, tuple[int, ...]] = {}
        checked: dict[int, tuple[object, tuple[int, ...]]] = {}  # by the id of a list replicas returned again
        for name in doc["tensors"]:
            try:
                holders[name] = agree.holders_of(replicas, name, leaves[name].shard(), comm.rank, comm.size, checked)
            except Exception as e:
                doc["errors"].append(f"replicas: {type(e).__name__}: {e}")
        local_errors = int(bool(doc["errors"]))
        ok, token = agree.verdict(
            comm.all_reduce_sum(agree.vector(doc, holders, comm.rank, token, local_errors)), comm.size
        )
        if ok:
            return local_plan(doc, holders, comm.rank), token
        doc["holders"] = {name: list(ranks) for name, ranks in holders.items()}
    doc["token"] = token
    docs = comm.all_gather_json(doc)
    p = plan(docs, comm.rank)
    if replicas is not None and not p.errors and comm.rank == 0:
        where = agree.first_disagreement(docs) or "the ranks hold different values"
        warnings.warn(f"ckpt.save: planned by exchanging descriptions: {where}", stacklevel=3)
    return p, docs[0]["token"]


def _write_and_commit(job: _Job, comm: Comm, after_write: AfterWrite | None) -> Path:
    record: dict[str, Any] = {"error": None, "files": {}, "fragment": job.fragment}
    try:
        if comm.rank == 0 or job.tensors:
            job.tmp.mkdir(parents=True, exist_ok=True)
        if job.tensors:
            name = file_name(comm.rank)
            target = job.tmp / name
            save_file(job.tensors, str(target))
            files.fsync_path(target)
            size, digest = files.sha256_file(target)
            record["files"][name] = {"size": size, "sha256": digest}
            if after_write is not None:
                after_write(target)
    except Exception as e:
        record["error"] = f"{type(e).__name__}: {e}"
    records = comm.gather_json(record)
    status = None
    if records is not None:
        status = _commit(job, records)
    status = comm.broadcast_json(status)
    if status is not None:
        raise CheckpointError(f"cannot save {job.path}: {status}")
    return job.path


def _commit(job: _Job, records: list[dict]) -> str | None:
    """Rank 0: write the index and rename into place; the reason it failed, or ``None``."""
    failed = [f"rank {r}: {rec['error']}" for r, rec in enumerate(records) if rec["error"]]
    try:
        if not failed:
            index, conflicts = assemble([rec["fragment"] for rec in records])
            failed += conflicts
        if not failed:
            job.body.update(index)
            job.body["files"] = {n: f for rec in records for n, f in rec["files"].items()}
            files.commit(job.tmp, job.path, job.body)
    except CheckpointError as e:
        failed.append(str(e))
    except Exception as e:
        failed.append(f"rank 0 commit: {type(e).__name__}: {e}")
    if failed:
        shutil.rmtree(job.tmp, ignore_errors=True)
        return "; ".join(failed)
    if job.keep is not None:
        try:
            files.retain(job.path.parent, job.keep, job.path)
        except OSError as e:
            return f"saved, but retention failed: {e}"
    return None


def _to_host(t: torch.Tensor, copy: bool) -> torch.Tensor:
    """``t`` in CPU memory, contiguous; a private copy when ``copy`` (pinned when it came from a GPU)."""
    t = t.detach()
    if t.device.type == "cpu":
        return t.clone(memory_format=torch.contiguous_format) if copy else t.contiguous()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
    host.copy_(t)
    return host


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (views of one flat buffer): copy all but the first."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        out[name] = t.clone() if ptr is not None and ptr in seen else t
        if ptr is not None:
            seen.add(ptr)
    return out


def _json_layout(layout: Any) -> Any:
    if dataclasses.is_dataclass(layout) and not isinstance(layout, type):
        layout = dataclasses.asdict(layout)
    json.dumps(layout)
    return layout

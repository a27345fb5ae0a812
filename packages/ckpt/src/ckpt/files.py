"""The checkpoint directory on disk: names, checksums, durable writes, the commit, ``latest`` and retention.

A checkpoint is a directory holding data files and ``index.json``. It is written under a hidden
temporary name next to its final name (``.NAME.partial-TOKEN``), the index is written last, every
file and the directory are fsynced, and a rename makes it visible: a directory without the hidden
prefix that holds an index is complete. Readers leave a ``.reading-*`` marker so that retention
never deletes a checkpoint being read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import CheckpointError

INDEX = "index.json"
READING = ".reading-"
CHUNK = 8 << 20


def temporary_dir(path: Path, token: str) -> Path:
    """Where a checkpoint for ``path`` is written before it is renamed into place."""
    return path.parent / f".{path.name}.partial-{token}"


def new_token() -> str:
    return uuid.uuid4().hex[:12]


def sha256_file(path: Path) -> tuple[int, str]:
    """Size and SHA-256 of a file, read in large chunks (hashlib releases the GIL on them)."""
    digest, size = hashlib.sha256(), 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
            size += n
    return size, digest.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file or a directory entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, doc: object) -> None:
    """Write ``doc`` as JSON and fsync it."""
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def commit(tmp: Path, path: Path, index: dict) -> None:
    """Check that every data file the index lists is in ``tmp`` as recorded, write the index last, make
    everything durable, then rename ``tmp`` to ``path``."""
    missing = [n for n, r in sorted(index["files"].items()) if not _has_size(tmp / n, r["size"])]
    if missing:
        raise CheckpointError(
            f"{len(missing)} of {len(index['files'])} data files are missing or incomplete in {tmp}, where rank 0 "
            f"writes the index: {', '.join(missing)}; every rank must save to storage that rank 0 sees "
            "(a file system shared by all nodes)"
        )
    write_json(tmp / INDEX, index)
    fsync_path(tmp)
    os.rename(tmp, path)
    fsync_path(path.parent)


def resolve_member(root: Path, name: str) -> Path:
    """``root/name``, refusing names that leave ``root`` (absolute, ``..``, or a symlink pointing out)."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts:
        raise CheckpointError(f"{root}: index names the file {name!r}, which escapes the checkpoint directory")
    target = root / name
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(target)]) != real_root:
        raise CheckpointError(f"{root}: file {name!r} resolves outside the checkpoint directory")
    return target


def read_index(path: Path) -> dict:
    """The index of the complete checkpoint at ``path``."""
    index_path = Path(path) / INDEX
    if not index_path.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint: {INDEX} is missing")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{index_path} cannot be read: {e}") from e
    if not isinstance(index, dict) or index.get("format") != "ckpt":
        raise CheckpointError(f"{index_path} is not a ckpt index")
    if index.get("version") != 1:
        raise CheckpointError(f"{index_path} has version {index.get('version')!r}; this ckpt reads version 1")
    fields = ("files", "tensors", "rank_tensors", "values", "rank_values")
    missing = [f for f in fields if not isinstance(index.get(f), dict)]
    if missing:
        raise CheckpointError(f"{index_path} is malformed: {missing} missing or not objects")
    return index


def verify_file(root: Path, name: str, record: dict) -> None:
    """Check one data file's size and checksum against its index record."""
    path = resolve_member(root, name)
    if not path.is_file():
        raise CheckpointError(f"{path}: data file is missing")
    size, digest = sha256_file(path)
    if size != record["size"] or digest != record["sha256"]:
        raise CheckpointError(
            f"{path}: checksum mismatch (size {size}, expected {record['size']}; the file is corrupt)"
        )


def _order(path: Path) -> tuple[int, float, str]:
    numbers = re.findall(r"\d+", path.name)
    return (int(numbers[-1]) if numbers else -1, path.stat().st_mtime, path.name)


def complete(root: Path) -> list[Path]:
    """The complete checkpoints directly under ``root``, oldest first (by the last number in the name)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / INDEX).is_file()]
    return sorted(found, key=_order)


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def problem(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be loaded, found without reading its data (the index is
    readable and every data file is there with its recorded size); ``None`` when nothing is wrong."""
    try:
        index = read_index(path)
        for name, record in sorted(index["files"].items()):
            if not _has_size(resolve_member(path, name), record["size"]):
                return f"data file {path / name} is missing or has the wrong size"
    except CheckpointError as e:
        return str(e)
    return None


def _log_warning(message: str) -> None:
    logging.getLogger("ckpt").warning(message)


def intact(root: str | os.PathLike, *, warn: Callable[[str], None] | None = _log_warning) -> list[Path]:
    """The checkpoints under ``root`` that pass :func:`problem`, newest first; ``warn`` is told about each
    complete-looking one that does not (naming it and why)."""
    found = []
    for candidate in reversed(complete(Path(root))):
        trouble = problem(candidate)
        if trouble is None:
            found.append(candidate)
        elif warn is not None:
            warn(f"skipping checkpoint {candidate}: {trouble}")
    return found


def latest(root: str | os.PathLike, *, warn: Callable[[str], None] | None = _log_warning) -> Path | None:
    """The newest intact checkpoint under ``root`` (``root/step_00000100`` style), or ``None``.

    Temporary directories of saves that did not finish are ignored; a newer checkpoint whose index or
    data files are missing or unreadable is skipped, and ``warn`` names it.
    """
    for candidate in reversed(complete(Path(root))):
        trouble = problem(candidate)
        if trouble is None:
            return candidate
        if warn is not None:
            warn(f"skipping checkpoint {candidate}: {trouble}")
    return None


_LEFTOVER = re.compile(r"^\.(.+)\.(partial|deleting)-[0-9a-f]+$")
_STEP = re.compile(r"^step_\d+$")


def clean(root: str | os.PathLike) -> list[Path]:
    """Remove what interrupted saves left under ``root``: hidden ``.NAME.partial-*`` and ``.NAME.deleting-*``
    directories, and ``step_N`` directories without an index. Returns what was removed. Call it on one
    rank, when no save into ``root`` is running."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for child in sorted(root.iterdir()):
        leftover = _LEFTOVER.match(child.name) or (_STEP.match(child.name) and not (child / INDEX).exists())
        if leftover and child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def step_dir(root: str | os.PathLike, step: int) -> Path:
    """The conventional checkpoint name for a training step: ``root/step_00000100``."""
    return Path(root) / f"step_{step:08d}"


def retain(root: Path, keep: int, protect: Path) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints, never ``protect`` nor one being read."""
    victims = [p for p in complete(root) if p != protect][: max(0, len(complete(root)) - keep)]
    deleted = []
    for victim in victims:
        if any(child.name.startswith(READING) for child in victim.iterdir()):
            continue
        trash = victim.parent / f".{victim.name}.deleting-{new_token()}"
        os.rename(victim, trash)  # invisible at once, removed at leisure
        shutil.rmtree(trash, ignore_errors=True)
        deleted.append(victim)
    return deleted


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Mark ``path`` as being read for the duration (best effort: a read-only checkpoint is fine)."""
    marker = path / f"{READING}{os.getpid()}-{new_token()}"
    try:
        marker.touch()
    except OSError:
        marker = None
    try:
        yield
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)

"""``trainer preprocess``: text or JSONL files to an indexed dataset, resumable, with a progress bar.

While it runs, tokens go to ``PREFIX.bin.partial`` and document ends to ``PREFIX.offsets.partial``; after each
completed chunk (a whole text file, or ``chunk_bytes`` of a JSONL file) both are flushed to disk and the
sidecar ``PREFIX.progress.json`` records how far the inputs were read and how many tokens and documents that
made. A rerun with the same inputs and settings truncates the partial files to that point and continues from
there. At the end ``PREFIX.bin`` then ``PREFIX.idx`` appear by atomic renames and the partial files and the
sidecar are removed: a reader never sees a half-written dataset.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .indexed import IndexedDataset, dataset_paths, dtype_for_vocab, encode_index, replace_atomically
from .sources import TEXT_UNITS, InputFile, check_inputs, read_chunks
from .tokenizer import Tokenizer, encode_documents, load_tokenizer

SIDECAR_VERSION = 1


def work_paths(prefix: str | Path) -> dict[str, Path]:
    """The final and in-progress files of a preprocess run writing ``prefix``."""
    bin_path, idx_path = dataset_paths(prefix)
    base = bin_path.with_suffix("")
    return {
        "bin": bin_path,
        "idx": idx_path,
        "tokens": base.with_name(base.name + ".bin.partial"),
        "offsets": base.with_name(base.name + ".offsets.partial"),
        "sidecar": base.with_name(base.name + ".progress.json"),
    }


def preprocess(
    inputs: Sequence[str | Path],
    output: str | Path,
    *,
    tokenizer: str | Path | Tokenizer = "byte",
    jsonl_key: str = "text",
    append_eos: bool = False,
    text_unit: str = "file",
    overwrite: bool = False,
    chunk_bytes: int = 16 << 20,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> IndexedDataset:
    """Tokenize ``inputs`` into the indexed dataset ``output`` (a prefix); resumes an interrupted run.

    Every input is checked (exists, readable, holds a document) and the settings are compared with an
    unfinished run's sidecar before anything is written. ``overwrite`` discards an existing dataset or an
    unfinished run of different settings.
    """
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    if text_unit not in TEXT_UNITS:
        raise DataError(f"text_unit={text_unit!r} must be one of {', '.join(TEXT_UNITS)}")
    if chunk_bytes < 1:
        raise DataError(f"chunk_bytes={chunk_bytes} must be positive")
    if append_eos and tok.eos_id is None:
        raise DataError(f"append_eos needs an end-of-document token, and tokenizer {tok!r} has none")
    sources = check_inputs(inputs, jsonl_key)
    paths = work_paths(output)
    dtype = dtype_for_vocab(tok.vocab_size)
    settings = {
        "tokenizer": tok.name,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "dtype": dtype.name,
        "jsonl_key": jsonl_key,
        "append_eos": append_eos,
        "text_unit": text_unit,
        "inputs": [s.fingerprint() for s in sources],
    }
    log = log or (lambda message: None)
    state = _start(paths, settings, overwrite, log)
    _run(tok, sources, paths, state, settings, dtype, chunk_bytes, progress)
    return _finish(paths, settings, state, dtype)


def _start(paths: dict[str, Path], settings: dict[str, Any], overwrite: bool, log: Callable[[str], None]) -> dict:
    """The progress to continue from: a matching sidecar's, or a fresh start (removing stale files)."""
    sidecar = paths["sidecar"]
    if overwrite:
        for key in ("sidecar", "tokens", "offsets", "idx", "bin"):
            paths[key].unlink(missing_ok=True)
    if sidecar.exists():
        try:
            saved = json.loads(sidecar.read_text(encoding="utf-8"))
            state, previous = saved["state"], saved["settings"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(
                f"progress file {sidecar} is corrupt ({err}); rerun with --overwrite to start over"
            ) from err
        if saved.get("version") == SIDECAR_VERSION and _only_unread_inputs_changed(previous, settings, state):
            log("inputs not read yet by the unfinished run have changed since; continuing with them")
            previous = settings
            _save_state(paths, settings, state)
        if saved.get("version") != SIDECAR_VERSION or previous != settings:
            changed = sorted(k for k in settings if previous.get(k) != settings[k]) or ["version"]
            raise DataError(
                f"an unfinished preprocess of {paths['bin'].with_suffix('')} used other settings "
                f"({', '.join(changed)} differ); rerun with the same ones to resume, or with --overwrite to start over"
            )
        if state["done_files"] == len(settings["inputs"]) and not paths["tokens"].exists() and paths["bin"].exists():
            os.replace(paths["bin"], paths["tokens"])  # stopped while renaming the finished files: finish again
        for key, size in (
            ("tokens", state["num_tokens"] * np.dtype(settings["dtype"]).itemsize),
            ("offsets", state["num_docs"] * 8),
        ):
            if not paths[key].exists() or paths[key].stat().st_size < size:
                raise DataError(f"{paths[key]} is missing or shorter than {sidecar} records; rerun with --overwrite")
            os.truncate(paths[key], size)
        log(
            f"resuming: {state['done_files']} of {len(settings['inputs'])} inputs done, "
            f"{state['num_docs']} documents, {state['num_tokens']} tokens"
        )
        return state
    if paths["idx"].exists():
        raise DataError(f"{paths['idx']} already exists; pass --overwrite to replace it")
    for key in ("tokens", "offsets"):
        paths[key].unlink(missing_ok=True)
    paths["bin"].parent.mkdir(parents=True, exist_ok=True)
    state = {"done_files": 0, "offset": 0, "line": 0, "num_tokens": 0, "num_docs": 0}
    _save_state(paths, settings, state)
    return state


def _only_unread_inputs_changed(previous: dict[str, Any], settings: dict[str, Any], state: dict[str, Any]) -> bool:
    """Whether the settings differ only in inputs the unfinished run has not started reading (say, a file
    that failed to decode and was fixed): those can change without invalidating what was written."""
    try:
        read = state["done_files"] + (1 if state["offset"] else 0)
        old, new = previous["inputs"], settings["inputs"]
        same_rest = {k: v for k, v in previous.items() if k != "inputs"} == {
            k: v for k, v in settings.items() if k != "inputs"
        }
    except (KeyError, TypeError):
        return False
    return same_rest and len(old) == len(new) and old[:read] == new[:read] and old != new


def _save_state(paths: dict[str, Path], settings: dict[str, Any], state: dict[str, int]) -> None:
    body = {"version": SIDECAR_VERSION, "settings": settings, "state": state}
    replace_atomically(paths["sidecar"], json.dumps(body, indent=1).encode("utf-8"))


def _run(
    tok: Tokenizer,
    sources: list[InputFile],
    paths: dict[str, Path],
    state: dict[str, int],
    settings: dict[str, Any],
    dtype: np.dtype,
    chunk_bytes: int,
    progress: bool,
) -> None:
    total = sum(s.size for s in sources)
    done = sum(s.size for s in sources[: state["done_files"]]) + state["offset"]
    with (
        _Progress(total, done, enabled=progress) as bar,
        open(paths["tokens"], "ab") as tokens,
        open(paths["offsets"], "ab") as offsets,
    ):
        for index in range(state["done_files"], len(sources)):
            source = sources[index]
            bar.describe(source.path.name)
            for chunk in read_chunks(
                source,
                start=state["offset"],
                start_line=state["line"],
                jsonl_key=settings["jsonl_key"],
                unit=settings["text_unit"],
                chunk_bytes=chunk_bytes,
            ):
                docs = encode_documents(tok, chunk.texts, settings["append_eos"], dtype)
                ends = state["num_tokens"] + np.cumsum([len(d) for d in docs], dtype=np.int64)
                for doc in docs:
                    tokens.write(doc.tobytes())
                offsets.write(ends.astype("<u8").tobytes())
                for f in (tokens, offsets):
                    f.flush()
                    os.fsync(f.fileno())
                state["num_tokens"] = int(ends[-1]) if len(docs) else state["num_tokens"]
                state["num_docs"] += len(docs)
                state["offset"], state["line"] = chunk.end_offset, chunk.end_line
                if chunk.end_offset >= source.size:
                    state.update(done_files=index + 1, offset=0, line=0)
                _save_state(paths, settings, state)
                bar.advance_to(sum(s.size for s in sources[: state["done_files"]]) + state["offset"])


def _finish(paths: dict[str, Path], settings: dict[str, Any], state: dict[str, int], dtype: np.dtype) -> IndexedDataset:
    if state["num_docs"] == 0:
        for key in ("sidecar", "tokens", "offsets"):
            paths[key].unlink(missing_ok=True)
        raise DataError("the inputs hold no non-empty document; nothing was written")
    ends = np.fromfile(paths["offsets"], dtype="<u8")
    offsets = np.concatenate([np.zeros(1, dtype="<u8"), ends])
    meta = {k: settings[k] for k in ("tokenizer", "vocab_size", "eos_id", "append_eos")}
    meta["sources"] = [Path(s["path"]).name for s in settings["inputs"]]
    meta["max_token_id"] = _max_token(paths["tokens"], dtype)
    os.replace(paths["tokens"], paths["bin"])
    replace_atomically(paths["idx"], encode_index(offsets, dtype, meta))
    paths["offsets"].unlink()
    paths["sidecar"].unlink()
    return IndexedDataset(paths["bin"])


def _max_token(path: Path, dtype: np.dtype) -> int:
    """The largest token id in the token file (read in blocks), recorded in the index."""
    tokens = np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)
    top = -1
    for start in range(0, len(tokens), 1 << 24):
        top = max(top, int(tokens[start : start + (1 << 24)].max()))
    del tokens
    return top


class _Progress:
    """A ``rich`` progress bar over bytes of input on stderr, or nothing."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._task = self._bar.add_task("preprocess", total=total, completed=done)

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=text)

    def advance_to(self, done: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=done)

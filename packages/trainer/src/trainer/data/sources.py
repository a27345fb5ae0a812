"""The inputs of ``trainer preprocess``: checked before anything is written, then read as documents in chunks.

Formats, by file name: ``*.jsonl`` / ``*.ndjson`` hold one document per line, a JSON object whose ``key`` field
(``"text"`` by default) is the document; blank lines are skipped. Every other file is UTF-8 text: the whole
file is one document (``unit="file"``, the default: a source file, a book), or each blank-line-separated
paragraph is one (``unit="paragraph"``). Empty documents are skipped.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
TEXT_UNITS = ("file", "paragraph")
_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")


@dataclass(frozen=True)
class InputFile:
    """One checked input: its path, format and the fingerprint (size, mtime) a resumed run compares."""

    path: Path
    kind: str  # "jsonl" or "text"
    size: int
    mtime_ns: int

    def fingerprint(self) -> dict[str, object]:
        return {"path": str(self.path), "size": self.size, "mtime_ns": self.mtime_ns}


@dataclass(frozen=True)
class Chunk:
    """Documents read from one input, and where the next chunk starts (byte offset and line number)."""

    texts: list[str]
    end_offset: int
    end_line: int


def check_inputs(paths: Sequence[str | Path], jsonl_key: str = "text") -> list[InputFile]:
    """Each input exists, is a readable regular file and holds at least one document; JSONL files start with an
    object that has a string ``jsonl_key``. Reads only the start of each file."""
    if not paths:
        raise DataError("no input files given")
    inputs = []
    for raw in paths:
        path = Path(raw).resolve()
        if not path.exists():
            raise DataError(f"input {raw} does not exist")
        if not path.is_file():
            raise DataError(f"input {raw} is not a regular file")
        kind = "jsonl" if path.suffix.lower() in JSONL_SUFFIXES else "text"
        try:
            with open(path, "rb") as f:
                found = _first_jsonl_document(f, raw, jsonl_key) if kind == "jsonl" else _has_text(f)
        except OSError as err:
            raise DataError(f"input {raw} cannot be read: {err.strerror or err}") from err
        if not found:
            raise DataError(f"input {raw} is empty: it holds no document")
        stat = path.stat()
        inputs.append(InputFile(path, kind, stat.st_size, stat.st_mtime_ns))
    return inputs


def _has_text(f) -> bool:
    """Whether the text file holds a non-blank character; refuses a file that is not UTF-8 (before anything
    is written, so that no unfinished run is left behind)."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    found, offset = False, 0
    while True:
        block = f.read(1 << 20)
        pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous block
        try:
            found = bool(decoder.decode(block, final=not block).strip()) or found
        except UnicodeDecodeError as err:
            raise DataError(
                f"input {f.name} is not UTF-8 text (invalid byte at offset {offset - pending + err.start})"
            ) from err
        if not block:
            return found
        offset += len(block)


def _first_jsonl_document(f, name: str | Path, key: str) -> bool:
    for number, line in enumerate(f, start=1):
        if line.strip():
            _jsonl_text(line, name, number, key)
            return True
    return False


def _jsonl_text(line: bytes, name: str | Path, number: int, key: str) -> str:
    try:
        record = json.loads(line)
    except ValueError as err:  # also UnicodeDecodeError
        raise DataError(f"{name}:{number}: not a JSON line ({err})") from err
    if not isinstance(record, dict):
        raise DataError(f"{name}:{number}: expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise DataError(f"{name}:{number}: no field {key!r} (fields: {', '.join(sorted(record)) or 'none'})")
    text = record[key]
    if not isinstance(text, str):
        raise DataError(f"{name}:{number}: field {key!r} is {type(text).__name__}, not a string")
    return text


def read_chunks(
    source: InputFile,
    *,
    start: int = 0,
    start_line: int = 0,
    jsonl_key: str = "text",
    unit: str = "file",
    chunk_bytes: int = 16 << 20,
) -> Iterator[Chunk]:
    """The documents of ``source`` from byte ``start`` on, in chunks of about ``chunk_bytes`` of input.

    Text files come as one chunk (they are read whole); JSONL files as many, each ending after a complete line,
    so that a resumed run can start at ``end_offset``.
    """
    if unit not in TEXT_UNITS:
        raise DataError(f"unit={unit!r} must be one of {', '.join(TEXT_UNITS)}")
    if source.kind == "text":
        yield Chunk(_text_documents(source.path, unit), source.size, 0)
        return
    with open(source.path, "rb") as f:
        f.seek(start)
        offset, number, texts, size = start, start_line, [], 0
        for line in f:
            number += 1
            offset += len(line)
            if line.strip():
                text = _jsonl_text(line, source.path, number, jsonl_key)
                if text:
                    texts.append(text)
                size += len(line)
            if size >= chunk_bytes:
                yield Chunk(texts, offset, number)
                texts, size = [], 0
        yield Chunk(texts, offset, number)


def _text_documents(path: Path, unit: str) -> list[str]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"input {path} is not UTF-8 text (invalid byte at offset {err.start})") from err
    if unit == "file":
        return [text] if text.strip() else []
    return [p.strip("\n") for p in _PARAGRAPH_BREAK.split(text.replace("\r\n", "\n")) if p.strip()]

"""The indexed dataset on disk: ``PREFIX.bin`` (all tokens, back to back) and ``PREFIX.idx`` (document boundaries).

``PREFIX.bin`` is the raw little-endian token array, ``uint16`` when the vocabulary has fewer than 65536
entries and ``uint32`` otherwise. ``PREFIX.idx`` is, little-endian::

    magic      8 bytes   b"TRAINIDX"
    version    uint32    1
    dtype      uint32    1 = uint16, 2 = uint32 (the token file's dtype)
    num_docs   uint64
    num_tokens uint64
    meta_len   uint64    length of the metadata JSON that follows
    meta       meta_len bytes of UTF-8 JSON (tokenizer name, vocab_size, max_token_id, eos_id, ...), then spaces up to a
               multiple of 8 bytes
    offsets    uint64[num_docs + 1]: document i is tokens[offsets[i]:offsets[i + 1]]

Both files are read through ``np.memmap``: opening a dataset costs nothing, whatever its size. No pickle.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError

MAGIC = b"TRAINIDX"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQQ")
_DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
_CODES = {dt: code for code, dt in _DTYPES.items()}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """``uint16`` when every token id fits (vocab_size <= 65536), else ``uint32``."""
    if vocab_size < 1:
        raise DataError(f"vocab_size={vocab_size} must be at least 1")
    return _DTYPES[1] if vocab_size <= 1 << 16 else _DTYPES[2]


def dataset_paths(prefix: str | Path) -> tuple[Path, Path]:
    """``(PREFIX.bin, PREFIX.idx)``; a prefix given with either suffix is accepted."""
    prefix = Path(prefix)
    if prefix.suffix in (".bin", ".idx"):
        prefix = prefix.with_suffix("")
    return prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx")


def encode_index(offsets: np.ndarray, dtype: np.dtype, meta: dict[str, Any]) -> bytes:
    """The bytes of an index file for documents ending at ``offsets[1:]``."""
    offsets = np.asarray(offsets, dtype="<u8")
    body = json.dumps(meta, sort_keys=True).encode("utf-8")
    pad = b" " * (-(_HEADER.size + len(body)) % 8)
    header = _HEADER.pack(MAGIC, VERSION, _CODES[np.dtype(dtype)], len(offsets) - 1, int(offsets[-1]), len(body))
    return header + body + pad + offsets.tobytes()


def replace_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_dataset(
    prefix: str | Path, documents: Iterable[np.ndarray | list[int]], vocab_size: int, meta: dict[str, Any]
) -> IndexedDataset:
    """Write whole documents (token id arrays) as an indexed dataset, atomically; returns it opened.

    For data that fits in memory (tests, the default corpus); ``trainer preprocess`` streams and resumes.
    """
    bin_path, idx_path = dataset_paths(prefix)
    dtype = dtype_for_vocab(vocab_size)
    offsets, top = [0], -1
    tmp = bin_path.with_name(f".{bin_path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        for doc in documents:
            arr = np.asarray(doc)
            if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
                raise DataError(f"document {len(offsets) - 1} has a token id outside [0, {vocab_size})")
            top = max(top, int(arr.max())) if arr.size else top
            f.write(arr.astype(dtype).tobytes())
            offsets.append(offsets[-1] + arr.size)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, bin_path)
    replace_atomically(
        idx_path, encode_index(np.array(offsets), dtype, {**meta, "vocab_size": vocab_size, "max_token_id": top})
    )
    return IndexedDataset(prefix)


class IndexedDataset:
    """A read-only, memory-mapped indexed dataset: ``len(ds)`` documents, ``ds[i]`` the tokens of document i."""

    def __init__(self, prefix: str | Path) -> None:
        self.bin_path, self.idx_path = dataset_paths(prefix)
        self.prefix = self.bin_path.with_suffix("")
        self.dtype, self.meta, self.offsets = _read_index(self.idx_path)
        self.num_tokens = int(self.offsets[-1])
        if not self.bin_path.is_file():
            raise DataError(f"token file {self.bin_path} does not exist (its index {self.idx_path} does)")
        expected = self.num_tokens * self.dtype.itemsize
        actual = self.bin_path.stat().st_size
        if actual != expected:
            raise DataError(
                f"token file {self.bin_path} has {actual} bytes but its index says {self.num_tokens} tokens of "
                f"{self.dtype.name} ({expected} bytes): the file is truncated or belongs to another index"
            )
        if self.num_tokens:
            self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,))
        else:
            self.tokens = np.zeros(0, dtype=self.dtype)

    @property
    def vocab_size(self) -> int | None:
        return self.meta.get("vocab_size")

    @property
    def max_token_id(self) -> int:
        """The largest token id in the dataset (-1 when empty): recorded in the index by the writers, or
        found by one pass over the tokens for an index that does not record it."""
        if "max_token_id" not in self.meta:
            top = -1
            for start in range(0, self.num_tokens, 1 << 24):
                top = max(top, int(self.tokens[start : start + (1 << 24)].max()))
            self.meta["max_token_id"] = top
        return int(self.meta["max_token_id"])

    @property
    def tokenizer(self) -> str | None:
        """The ``name`` of the tokenizer that made the tokens (``"byte"``, ``"hf:<hash>"``)."""
        return self.meta.get("tokenizer")

    @property
    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets).astype(np.int64)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} of a dataset with {len(self)} documents")
        i %= len(self)
        return self.tokens[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def __repr__(self) -> str:
        return f"IndexedDataset({str(self.prefix)!r}, documents={len(self)}, tokens={self.num_tokens})"


def _read_index(path: Path) -> tuple[np.dtype, dict[str, Any], np.ndarray]:
    if not path.is_file():
        raise DataError(f"index file {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise DataError(
                f"index file {path} is truncated: {size} bytes, shorter than the {_HEADER.size}-byte header"
            )
        magic, version, code, num_docs, num_tokens, meta_len = _HEADER.unpack(head)
        if magic != MAGIC:
            raise DataError(f"index file {path} is not a trainer index (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise DataError(f"index file {path} has format version {version}; this reader knows version {VERSION}")
        if code not in _DTYPES:
            raise DataError(f"index file {path} is corrupt: unknown token dtype code {code}")
        meta_end = _HEADER.size + meta_len
        start = meta_end + (-meta_end % 8)
        expected = start + 8 * (num_docs + 1)
        if size != expected:
            raise DataError(
                f"index file {path} is truncated or corrupt: {size} bytes, expected {expected} for {num_docs} documents"
            )
        try:
            meta = json.loads(f.read(meta_len).decode("utf-8"))
        except ValueError as err:
            raise DataError(f"index file {path} is corrupt: unreadable metadata ({err})") from err
    offsets = np.memmap(path, dtype="<u8", mode="r", offset=start, shape=(num_docs + 1,))
    if offsets[0] != 0 or offsets[-1] != num_tokens or (num_docs and bool(np.any(offsets[1:] < offsets[:-1]))):
        raise DataError(f"index file {path} is corrupt: its document offsets are not increasing from 0 to {num_tokens}")
    return _DTYPES[code], meta, offsets

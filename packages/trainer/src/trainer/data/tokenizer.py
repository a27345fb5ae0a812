"""Tokenizers behind one small protocol: a byte-level one needing no files (the default) and Hugging Face ones.

``load_tokenizer("byte")`` gives the byte tokenizer; ``load_tokenizer("path/to/tokenizer.json")`` (or a directory
holding one) loads any Hugging Face ``tokenizers`` file. Every tokenizer has a ``name`` that identifies it
exactly (a content hash for files), so datasets and resumable preprocessing can refuse a different tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from .errors import DataError

# Names a tokenizer.json commonly gives its end-of-document token, tried in order when no tokenizer_config.json
# next to it says which one it is.
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[EOS]")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline, training and generation need from a tokenizer."""

    name: str
    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0-255 plus an end-of-document token ``<eos>`` = 256; needs no files."""

    name = "byte"
    vocab_size = 257
    eos_id: int | None = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def encode_arrays(self, texts: Sequence[str], dtype: np.dtype) -> list[np.ndarray]:
        """``encode`` of each text as a numpy array, without a Python int per byte."""
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(dtype) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes back to text; special tokens are skipped and invalid UTF-8 is replaced (generation can cut a
        multi-byte character)."""
        bad = [i for i in ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise DataError(f"token id {bad[0]} is outside the byte tokenizer's vocabulary [0, {self.vocab_size})")
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` through the ``tokenizers`` library.

    The end-of-document token is ``eos_token`` when given, else the ``eos_token`` of a ``tokenizer_config.json``
    in the same directory, else the first of a few common names found in the vocabulary, else ``None``.
    """

    def __init__(self, path: str | Path, eos_token: str | None = None) -> None:
        from tokenizers import Tokenizer as _HF

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"tokenizer file {path} does not exist")
        raw = path.read_bytes()
        try:
            self._tok = _HF.from_str(raw.decode("utf-8"))
        except Exception as err:  # the library raises a bare Exception for a malformed file
            raise DataError(f"tokenizer file {path} is not a valid tokenizer.json: {err}") from err
        self.path = path
        self.name = f"hf:{hashlib.sha256(raw).hexdigest()[:16]}"
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.eos_id = self._find_eos(eos_token)

    def _find_eos(self, eos_token: str | None) -> int | None:
        if eos_token is None:
            eos_token = _configured_eos(self.path.parent / "tokenizer_config.json")
        if eos_token is not None:
            eos = self._tok.token_to_id(eos_token)
            if eos is None:
                raise DataError(f"end-of-document token {eos_token!r} is not in the vocabulary of {self.path}")
            return int(eos)
        for candidate in _EOS_CANDIDATES:
            eos = self._tok.token_to_id(candidate)
            if eos is not None:
                return int(eos)
        return None

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r})"


def _configured_eos(config: Path) -> str | None:
    if not config.is_file():
        return None
    try:
        eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(eos, dict):  # the AddedToken form {"content": "</s>", ...}
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def load_tokenizer(spec: str | Path = "byte") -> ByteTokenizer | HFTokenizer:
    """``"byte"`` for the byte tokenizer, otherwise the path of a ``tokenizer.json`` (or of its directory)."""
    if str(spec) == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)


def encode_batch(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Encode many texts, through the tokenizer's own batch path when it has one (HF's is parallel)."""
    batch = getattr(tokenizer, "encode_batch", None)
    return batch(texts) if batch is not None else [tokenizer.encode(t) for t in texts]


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str], append_eos: bool, dtype: np.dtype) -> list[np.ndarray]:
    """Each text as a token array of ``dtype`` (plus the end-of-document token when ``append_eos``); empty
    documents are dropped. Uses the tokenizer's ``encode_arrays`` when it has one."""
    arrays = getattr(tokenizer, "encode_arrays", None)
    if arrays is not None:
        docs = arrays(texts, dtype)
    else:
        docs = [np.asarray(ids, dtype=dtype) for ids in encode_batch(tokenizer, texts)]
    if append_eos:
        if tokenizer.eos_id is None:
            raise DataError(f"append_eos needs an end-of-document token, and tokenizer {tokenizer!r} has none")
        eos = np.array([tokenizer.eos_id], dtype=dtype)
        docs = [np.concatenate([d, eos]) for d in docs if len(d)]
    return [d for d in docs if len(d)]

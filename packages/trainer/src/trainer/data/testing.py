"""Small fixtures for data tests (here and in integration tests): a tiny trained tokenizer and corpora."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from trainer.data.indexed import IndexedDataset, write_dataset

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs.",
    "How vexingly quick daft zebras jump!",
    "Sphinx of black quartz, judge my vow.",
    "Grüße aus Köln — naïve café, 東京 ok.",
]


def train_hf_tokenizer(directory: str | Path, vocab_size: int = 320, eos: str = "<|endoftext|>") -> Path:
    """``directory/tokenizer.json``: a byte-level BPE trained by the ``tokenizers`` library on ``SENTENCES``
    (offline, well under a second), with ``eos`` as its one special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES * 20, trainer=trainer)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "tokenizer.json"
    tok.save(str(path))
    return path


def write_jsonl(path: str | Path, texts: list[str], key: str = "text") -> Path:
    """``texts`` as a JSONL file, each under ``key`` (with an ``id`` field beside it)."""
    path = Path(path)
    path.write_text("".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


def run_length_dataset(prefix: str | Path, lengths: list[int]) -> IndexedDataset:
    """Document ``i`` is ``lengths[i]`` copies of token ``i + 1``: any stretch of tokens tells where it came from."""
    docs = [np.full(n, i + 1, dtype=np.int64) for i, n in enumerate(lengths)]
    return write_dataset(prefix, docs, vocab_size=len(lengths) + 1, meta={"tokenizer": "test"})

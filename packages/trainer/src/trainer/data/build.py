"""From a :class:`DataConfig` to the train and valid sample datasets of a run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .blending import BlendedDataset, blend_counts
from .corpus import default_corpus
from .errors import DataError
from .indexed import IndexedDataset
from .packing import PackedDataset
from .samples import SampleDataset, split_documents
from .tokenizer import Tokenizer, load_tokenizer

PACKING = ("none", "pack")


@dataclass(frozen=True)
class DataConfig:
    """Where a run's tokens come from.

    ``paths``: indexed dataset prefixes (``trainer preprocess`` outputs); empty means the embedded default
    corpus (the Python standard library's source, see ``trainer.data.corpus``). ``weights``: one per path, for
    blending (default: equal). ``tokenizer``: ``"byte"`` or a ``tokenizer.json`` path; it must be the one the
    datasets were made with. ``valid_fraction``: share of each dataset's documents held out for evaluation,
    chosen by ``split_seed`` (independent of the training seed, so every run evaluates on the same documents).
    ``cache_dir``: where the default corpus is built (default ``$TRAINER_CACHE`` or ``~/.cache/trainer``).
    ``packing``: ``"none"`` (:class:`SampleDataset`) or ``"pack"`` (:class:`PackedDataset`).
    """

    paths: tuple[str, ...] = ()
    """indexed dataset prefixes from trainer preprocess (default: the embedded corpus)."""
    weights: tuple[float, ...] | None = None
    """blending weights, one per path (default: equal)."""
    tokenizer: str = "byte"
    """'byte' or the path of a tokenizer.json; the one the datasets were made with."""
    valid_fraction: float = 0.05
    """share of each dataset's documents held out for evaluation."""
    split_seed: int = 0
    """seed of the train/validation split (independent of the training seed)."""
    cache_dir: str | None = None
    """where the embedded corpus is built (default: $TRAINER_CACHE or ~/.cache/trainer)."""
    packing: str = "none"
    """'none': windows of seq_len + 1 tokens cut across documents; 'pack': whole documents packed into
    seq_len tokens, attention and positions kept inside each document (trainer.data.packing)."""

    def __post_init__(self) -> None:
        if not isinstance(self.paths, (list, tuple)) or not all(isinstance(p, str) for p in self.paths):
            raise DataError(f"data.paths={self.paths!r}: must be a list of dataset prefixes (strings)")
        if self.weights is not None and (
            not isinstance(self.weights, (list, tuple))
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in self.weights)
        ):
            raise DataError(f"data.weights={self.weights!r}: must be a list of numbers, one per path")
        if not isinstance(self.tokenizer, str):
            raise DataError(f"data.tokenizer={self.tokenizer!r}: must be 'byte' or the path of a tokenizer.json")
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int) or self.split_seed < 0:
            raise DataError(f"data.split_seed={self.split_seed!r}: must be an integer >= 0")
        if isinstance(self.valid_fraction, bool) or not isinstance(self.valid_fraction, (int, float)):
            raise DataError(f"data.valid_fraction={self.valid_fraction!r}: must be a number in [0, 1)")
        object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
            if len(self.weights) != len(self.paths):
                raise DataError(f"data.weights has {len(self.weights)} entries but paths has {len(self.paths)}")
            blend_counts(self.weights)  # positive, finite, not too small
        if self.packing not in PACKING:
            raise DataError(f"data.packing={self.packing!r}: must be one of {', '.join(map(repr, PACKING))}")
        if not 0 <= self.valid_fraction < 1:
            raise DataError(f"data.valid_fraction={self.valid_fraction} must be in [0, 1)")


@dataclass(frozen=True)
class Datasets:
    """The samples a run trains and evaluates on, the tokenizer that reads and writes their tokens, and the
    indexed datasets they come from."""

    train: SampleDataset | PackedDataset | BlendedDataset
    valid: SampleDataset | PackedDataset | BlendedDataset | None
    tokenizer: Tokenizer
    sources: tuple[IndexedDataset, ...] = ()


def _derived_seed(*entropy: int) -> int:
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


def build_datasets(
    config: DataConfig,
    *,
    seq_len: int,
    seed: int,
    tokenizer: Tokenizer | None = None,
    log: Callable[[str], None] | None = None,
) -> Datasets:
    """Open (or build, for the default corpus, telling ``log``) the datasets, split them by document and blend
    them.

    Dataset ``i`` of the blend is shuffled with a seed derived from ``(seed, i)``; the valid samples with one
    derived from ``split_seed`` only.
    """
    tok = tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer)
    if config.paths:
        sources = [IndexedDataset(p) for p in config.paths]
    else:
        sources = [default_corpus(config.cache_dir, tok, log=log)]
    for ds in sources:
        if ds.tokenizer is not None and ds.tokenizer != tok.name:
            raise DataError(f"dataset {ds.prefix} was made with tokenizer {ds.tokenizer}, this run uses {tok.name}")
    weights = config.weights or (1.0,) * len(sources)
    kind = PackedDataset if config.packing == "pack" else SampleDataset
    train, valid = [], []
    for i, ds in enumerate(sources):
        train_ids, valid_ids = split_documents(len(ds), config.valid_fraction, config.split_seed)
        name = str(Path(ds.prefix).name)
        train.append(kind(ds, seq_len, _derived_seed(seed, i), train_ids, name=f"{name} (train)"))
        if len(valid_ids):
            seed_v = _derived_seed(config.split_seed, i, 1)
            valid.append(kind(ds, seq_len, seed_v, valid_ids, name=f"{name} (valid)"))
    return Datasets(_blend(train, weights), _blend(valid, weights) if valid else None, tok, tuple(sources))


def _blend(
    parts: list[SampleDataset] | list[PackedDataset], weights: tuple[float, ...]
) -> SampleDataset | PackedDataset | BlendedDataset:
    return parts[0] if len(parts) == 1 else BlendedDataset(parts, weights)

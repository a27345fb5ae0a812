"""``check_inputs``: the files a run names (tokenizer, datasets, ``--load``, ``--save``), checked before launch.

These checks open files but read almost nothing (indexes are memory-mapped, a checkpoint's index is a
small JSON file), so ``trainer train`` runs them before any rank starts and a missing or unusable file is
one line naming it. :func:`model_vocab` is the vocabulary rule the ranks apply again to what they open.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import ckpt

from ..data import DataError, IndexedDataset, load_tokenizer
from ..data.tokenizer import Tokenizer
from ..errors import TrainerError
from ..model import ModelConfig
from .run import RunConfig


def model_vocab(model: ModelConfig, tokenizer: Tokenizer, datasets: list[IndexedDataset]) -> ModelConfig:
    """``model`` with its vocabulary resolved (the tokenizer's when unset); raise when the tokenizer's or a
    dataset's largest token id does not fit in it, naming the dataset's file."""
    vocab = tokenizer.vocab_size
    if model.vocab_size is None:
        model = model.with_overrides(vocab_size=vocab)
    elif model.vocab_size < vocab:
        raise TrainerError(f"model.vocab_size={model.vocab_size}: must be >= the tokenizer's vocabulary size {vocab}")
    for ds in datasets:
        top = ds.max_token_id
        if top >= model.vocab_size:
            raise DataError(
                f"dataset {ds.bin_path} holds token id {top}, outside the model's vocabulary "
                f"[0, {model.vocab_size}): it was made with another tokenizer, or model.vocab_size is too small"
            )
    return model


def check_inputs(cfg: RunConfig) -> None:
    """Raise naming the first file of ``cfg`` that is missing or cannot be used."""
    d, t = cfg.data, cfg.train
    if d.tokenizer != "byte" and not Path(d.tokenizer).exists():
        raise DataError(f"data.tokenizer={d.tokenizer!r}: no such file or directory")
    tokenizer = load_tokenizer(d.tokenizer)
    datasets = []
    for prefix in d.paths:
        ds = IndexedDataset(prefix)
        if ds.tokenizer is not None and ds.tokenizer != tokenizer.name:
            raise DataError(
                f"dataset {ds.prefix} was made with tokenizer {ds.tokenizer}, this run uses {tokenizer.name}"
            )
        datasets.append(ds)
    model_vocab(cfg.model, tokenizer, datasets)
    if t.tensorboard is not None and importlib.util.find_spec("tensorboard") is None:
        raise TrainerError(
            f"train.tensorboard={t.tensorboard!r}: needs the tensorboard package (pip install tensorboard)"
        )
    if t.save is not None:
        _check_save_dir(t.save)
    if t.load is not None:
        _check_load(t.load)


def _check_save_dir(save: str) -> None:
    path = Path(save)
    if path.exists() and not path.is_dir():
        raise TrainerError(f"train.save={save!r}: is not a directory (checkpoints are directories under it)")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise TrainerError(f"train.save={save!r}: {parent} is not a writable directory")


def _check_load(load: str) -> None:
    path = Path(load)
    if not path.exists():
        raise TrainerError(f"train.load={load!r}: no such checkpoint or directory")
    if (path / ckpt.files.INDEX).exists():
        ckpt.files.read_index(path)  # an explicit checkpoint: its index must be readable (data: at load)
    elif not path.is_dir() or ckpt.latest(path, warn=None) is None:
        raise TrainerError(f"train.load={load!r}: holds no complete checkpoint")

"""``trainer convert``: our checkpoints to and from Hugging Face's format (the families of
:mod:`trainer.hf`).

Our checkpoints name every tensor without a layout (:func:`trainer.model.model_pieces`), so converting
reads or writes full tensors in one process. Export rebuilds the model from the checkpoint's config at
TP=PP=1 and loads it; import builds the model from ``config.json`` and fills it, then saves a
weights-only checkpoint that ``trainer train --load`` starts from (at step 0, any layout). The name
mapping is :func:`trainer.hf.adapter`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed as dist

import ckpt
import pstate
from pstate.device import default_device

from .config import RunConfig, parse_run_config, to_toml
from .data import load_tokenizer
from .errors import TrainerError
from .hf import adapter, family, hf_config, model_from_hf
from .hf.names import drop_ignored, fuse_parts
from .hf.stream import hf_tensor_names, load_hf_pieces
from .launch import default_group
from .model import ModelConfig, ModelGroups, build_chunks, weights_state
from .model.pieces import Piece
from .model.shards import model_pieces


def _one_process_model(cfg: RunConfig, model: ModelConfig, ps: pstate.ParallelState):
    (chunk,) = build_chunks(model, ModelGroups.from_state(ps), pp_rank=0, pp=1, seed=cfg.train.seed)
    return chunk


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MAX_SHARD_BYTES = 5 * 2**30
"""Exported safetensors are split into numbered files with an index past this size (as ``transformers``)."""


def export_to_hf(path: str | Path, out: str | Path, *, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """The newest checkpoint under ``path`` (or ``path`` itself) as a complete Hugging Face directory
    ``out``: weights (sharded past ``max_shard_bytes``), ``config.json``, ``generation_config.json`` and,
    when the run's tokenizer is a ``tokenizer.json``, the tokenizer files beside it."""
    found = Path(path) if (Path(path) / "index.json").exists() else ckpt.latest(path)
    if found is None:
        raise TrainerError(f"{path}: no complete checkpoint there")
    with default_group(default_device()), pstate.initialize(pstate.ParallelConfig()) as ps:
        cfg = parse_run_config(ckpt.load({"config": ""}, found)["config"], source=f"{found} config")
        model = cfg.model
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        if model.vocab_size is None:
            model = model.with_overrides(vocab_size=tokenizer.vocab_size)
        family(model)  # refuses a model no family holds
        chunk = _one_process_model(cfg, model, ps)
        weights = weights_state([chunk])
        ckpt.load(weights, found)
        state = {name: s.data for part in weights.values() for name, s in part.items()}
        fuse_parts(state, model_pieces([chunk]), model)
        extra = {"generation_config.json": _generation_config(tokenizer.eos_id)}
        if str(cfg.data.tokenizer) != "byte":
            folder = Path(tokenizer.path).parent
            extra.update({n: (folder / n).read_bytes() for n in TOKENIZER_FILES if (folder / n).is_file()})
        config = {**hf_config(model), "eos_token_id": tokenizer.eos_id}
        return ckpt.export_hf(
            state, out, adapter=adapter(model), config=config, max_shard_bytes=max_shard_bytes, extra_files=extra
        )


def _generation_config(eos_id: int | None) -> bytes:
    return json.dumps({"eos_token_id": eos_id, "do_sample": False}, indent=2).encode()


def import_from_hf(
    hf_dir: str | Path, save: str | Path, *, overrides: dict | None = None, parallel: dict | None = None
) -> Path:
    """A Hugging Face directory as a weights-only checkpoint ``save/step_00000000`` that ``trainer
    train --load`` starts from; the run config saved with it takes the model from ``config.json`` and
    the tokenizer from a ``tokenizer.json`` beside it. Every rank of the default group (one process
    when there is none) builds its part of the model at ``parallel`` (``pstate.ParallelConfig`` fields)
    and reads only its slices (:func:`trainer.hf.stream.load_hf_pieces`); a tensor in the files that the
    model has no place for is refused by name, before anything is written."""
    base = _hf_run(hf_dir)
    model = base.model
    if str(base.data.tokenizer) != "byte":
        size = load_tokenizer(base.data.tokenizer).vocab_size
        if size > model.vocab_size:
            rule = f"its {size} ids exceed config.json vocab_size={model.vocab_size}"
            raise TrainerError(f"{base.data.tokenizer}: {rule}")
    cfg = parse_run_config(to_toml(base), overrides or {})
    with default_group(default_device()), pstate.initialize(pstate.ParallelConfig(**(parallel or {}))) as ps:
        groups = ModelGroups.from_state(ps, sequence_parallel=ps.tp.size > 1 and model.num_experts > 0)
        chunks = build_chunks(model, groups, pp_rank=ps.pp.rank, pp=ps.pp.size, seed=cfg.train.seed, draw=False)
        weights = weights_state(chunks)
        shards = {n: s for part in weights.values() for n, s in part.items()}
        _refuse_extra_tensors(hf_dir, model, shards, model_pieces(chunks))
        try:
            load_hf_pieces(chunks, hf_dir)
            failed = None
        except TrainerError as error:  # a rank's own slice: every rank stops with it, none saves
            failed = str(error)
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, failed)
        if any(errors):
            raise TrainerError(next(e for e in errors if e))
        layout = {"hf": str(hf_dir)}
        return ckpt.save({**weights, "config": to_toml(cfg)}, ckpt.step_dir(save, 0), layout=layout)


def _refuse_extra_tensors(hf_dir: str | Path, model: ModelConfig, shards: dict, pieces: list[Piece]) -> None:
    """Every tensor in the folder's files must be one the model holds (a dropped weight is an error);
    the names every rank holds are gathered, so the check is the same at any layout."""
    state = {name: torch.empty(s.global_shape, device="meta") for name, s in shards.items()}
    fuse_parts(state, pieces, model)
    names = [None] * dist.get_world_size()
    dist.all_gather_object(names, sorted(adapter(model).to_hf(state)))
    expected = set().union(*names)
    stored = set(drop_ignored(dict.fromkeys(hf_tensor_names(hf_dir)), model))
    extra = sorted(stored - expected)
    if extra:
        raise TrainerError(f"{hf_dir}: tensors {extra[:5]} have no place in the {family(model)} model")


def with_checkpoint_model(cfg: RunConfig, *, explicit_model: bool) -> RunConfig:
    """``cfg`` taking its model (and, when the run names none, its tokenizer) from the checkpoint at
    ``cfg.train.load``, as ``trainer train --load`` does: no ``--model`` is needed. A model given
    explicitly (``explicit_model``) that differs from the checkpoint's is refused naming both."""
    load, hf = cfg.train.load, cfg.train.init_from_hf
    found = None if load is None else (Path(load) if (Path(load) / "index.json").exists() else ckpt.latest(load))
    if hf is not None:
        if found is not None:
            raise TrainerError(f"--init-from-hf {hf} and --load {load}: give one place to start from")
        stored, load = _hf_run(hf), hf
    elif found is None:
        return cfg
    else:
        try:
            stored = parse_run_config(ckpt.load({"config": ""}, found)["config"], source=f"{found} config")
        except (ckpt.CheckpointError, KeyError):
            return cfg  # a checkpoint without a stored config: the run's own model is the only one
    ours, theirs = cfg.model, stored.model
    if ours.vocab_size is None:
        ours = ours.with_overrides(vocab_size=theirs.vocab_size)
    if explicit_model and ours != theirs:
        differ = [f.name for f in dataclasses.fields(ours) if getattr(ours, f.name) != getattr(theirs, f.name)]
        raise TrainerError(
            f"{load}: the checkpoint's model differs from the one given ({', '.join(differ)}: "
            f"{', '.join(f'{n}={getattr(theirs, n)!r} vs {getattr(ours, n)!r}' for n in differ[:4])}); "
            "leave out --model / [model] to train the checkpoint's"
        )
    data = cfg.data
    if data.tokenizer == RunConfig().data.tokenizer and stored.data.tokenizer != data.tokenizer:
        data = dataclasses.replace(data, tokenizer=stored.data.tokenizer)
    return dataclasses.replace(cfg, model=theirs, data=data)


def _hf_run(hf_dir: str | Path) -> RunConfig:
    """The model (and the tokenizer beside it) of a Hugging Face folder, as a run configuration."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise TrainerError(f"{path}: config.json is missing")
    try:
        config = json.loads(path.read_text())
    except ValueError as error:
        raise TrainerError(f"{path}: not valid JSON ({error})") from None
    model = model_from_hf(config)
    tokenizer = Path(hf_dir) / "tokenizer.json"
    data = {"tokenizer": str(tokenizer.absolute())} if tokenizer.is_file() else {}
    return parse_run_config(to_toml(RunConfig(model=model)), {"data": data})

"""``trainer convert``: our checkpoints to and from Hugging Face's format (the families of
:mod:`trainer.hf`).

Our checkpoints name every tensor without a layout (:func:`trainer.model.model_pieces`), so converting
reads or writes full tensors in one process. Export rebuilds the model from the checkpoint's config at
TP=PP=1 and loads it; import builds the model from ``config.json`` and fills it, then saves a
weights-only checkpoint that ``trainer train --load`` starts from (at step 0, any layout). The name
mapping is :func:`trainer.hf.adapter`.
"""

from __future__ import annotations

from pathlib import Path

import ckpt
import pstate
from pstate.device import default_device

from .config import RunConfig, parse_run_config, to_toml
from .data import load_tokenizer
from .errors import TrainerError
from .hf import adapter, family, hf_config, model_from_hf
from .hf.names import drop_ignored, fuse_qkv, split_qkv
from .launch import default_group
from .model import ModelConfig, ModelGroups, build_chunks, model_shards


def _one_process_model(cfg: RunConfig, model: ModelConfig, ps: pstate.ParallelState):
    (chunk,) = build_chunks(model, ModelGroups.from_state(ps), pp_rank=0, pp=1, seed=cfg.train.seed)
    return chunk


def export_to_hf(path: str | Path, out: str | Path) -> Path:
    """The newest checkpoint under ``path`` (or ``path`` itself) as a Hugging Face directory ``out``."""
    found = Path(path) if (Path(path) / "index.json").exists() else ckpt.latest(path)
    if found is None:
        raise TrainerError(f"{path}: no complete checkpoint there")
    with default_group(default_device()), pstate.initialize(pstate.ParallelConfig()) as ps:
        cfg = parse_run_config(ckpt.load({"config": ""}, found)["config"], source=f"{found} config")
        model = cfg.model
        if model.vocab_size is None:
            model = model.with_overrides(vocab_size=load_tokenizer(cfg.data.tokenizer).vocab_size)
        kind = family(model)
        shards = model_shards([_one_process_model(cfg, model, ps)])
        ckpt.load({"model": shards}, found)
        state = {name: s.data for name, s in shards.items()}
        if kind == "gpt2":
            fuse_qkv(state, model.layers)
        return ckpt.export_hf(state, out, adapter=adapter(model), config=hf_config(model))


def import_from_hf(hf_dir: str | Path, save: str | Path, *, overrides: dict | None = None) -> Path:
    """A Hugging Face directory as a weights-only checkpoint ``save/step_00000000`` that ``trainer
    train --load`` starts from; the run config saved with it takes the model from ``config.json``."""
    _, config = ckpt.import_hf(hf_dir)
    if config is None:
        raise TrainerError(f"{hf_dir}: config.json is missing")
    model = model_from_hf(config)
    kind = family(model)
    raw, _ = ckpt.import_hf(hf_dir)
    try:
        state = adapter(model).from_hf(drop_ignored(raw, model))
    except ckpt.CheckpointError as error:
        raise TrainerError(f"{hf_dir}: {error}") from None
    if kind == "gpt2":
        split_qkv(state, model)
    tokenizer = Path(hf_dir) / "tokenizer.json"
    data = {"tokenizer": str(tokenizer.absolute())} if tokenizer.is_file() else {}
    cfg = parse_run_config(to_toml(RunConfig(model=model)), {"data": data, **(overrides or {})})
    with default_group(default_device()), pstate.initialize(pstate.ParallelConfig()) as ps:
        shards = model_shards([_one_process_model(cfg, model, ps)])
        missing = sorted(set(shards) - set(state))
        if missing:
            raise TrainerError(f"{hf_dir}: tensors {missing} are missing")
        for name, shard in shards.items():
            if tuple(state[name].shape) != tuple(shard.data.shape):
                raise TrainerError(
                    f"{hf_dir}: {name} has shape {tuple(state[name].shape)}, expected {tuple(shard.data.shape)}"
                )
            shard.data.copy_(state[name])
        return ckpt.save({"model": shards, "config": to_toml(cfg)}, ckpt.step_dir(save, 0), layout={"hf": str(hf_dir)})

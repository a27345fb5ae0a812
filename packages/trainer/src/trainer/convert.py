"""``trainer convert``: our checkpoints to and from Hugging Face's format (GPT-2 and Llama families).

Our checkpoints name every tensor without a layout (:func:`trainer.model.model_pieces`), so converting
reads or writes full tensors in one process. Export rebuilds the model from the checkpoint's config at
TP=PP=1 and loads it; import builds the model from ``config.json`` and fills it, then saves a
weights-only checkpoint that ``trainer train --load`` starts from (at step 0, any layout). The name
mapping is a ``ckpt.convert.Adapter``; GPT-2's fused, transposed ``c_attn`` is fused and split here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import ckpt
import pstate
from ckpt import Adapter, Rename, Transpose
from pstate.device import default_device

from .config import RunConfig, parse_run_config, to_toml
from .data import load_tokenizer
from .errors import TrainerError
from .launch import default_group
from .model import ModelConfig, ModelGroups, build_chunks, model_shards, preset

LLAMA = Adapter(
    (
        Rename("embedding.weight", "model.embed_tokens.weight"),
        Rename("layers.{i}.norm1.weight", "model.layers.{i}.input_layernorm.weight"),
        Rename("layers.{i}.norm2.weight", "model.layers.{i}.post_attention_layernorm.weight"),
        Rename("layers.{i}.attn.q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
        Rename("layers.{i}.attn.k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
        Rename("layers.{i}.attn.v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
        Rename("layers.{i}.attn.proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
        Rename("layers.{i}.mlp.gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
        Rename("layers.{i}.mlp.up.weight", "model.layers.{i}.mlp.up_proj.weight"),
        Rename("layers.{i}.mlp.fc2.weight", "model.layers.{i}.mlp.down_proj.weight"),
        Rename("final_norm.weight", "model.norm.weight"),
        Rename("head.weight", "lm_head.weight"),
    )
)
GPT2 = Adapter(
    (
        Rename("embedding.weight", "transformer.wte.weight"),
        Rename("position.weight", "transformer.wpe.weight"),
        *(
            Rename(f"layers.{{i}}.norm{n}.{w}", f"transformer.h.{{i}}.ln_{n}.{w}")
            for n in (1, 2)
            for w in ("weight", "bias")
        ),
        Transpose("layers.{i}.attn.qkv.weight", "transformer.h.{i}.attn.c_attn.weight"),
        Rename("layers.{i}.attn.qkv.bias", "transformer.h.{i}.attn.c_attn.bias"),
        Transpose("layers.{i}.attn.proj.weight", "transformer.h.{i}.attn.c_proj.weight"),
        Rename("layers.{i}.attn.proj.bias", "transformer.h.{i}.attn.c_proj.bias"),
        Transpose("layers.{i}.mlp.fc1.weight", "transformer.h.{i}.mlp.c_fc.weight"),
        Rename("layers.{i}.mlp.fc1.bias", "transformer.h.{i}.mlp.c_fc.bias"),
        Transpose("layers.{i}.mlp.fc2.weight", "transformer.h.{i}.mlp.c_proj.weight"),
        Rename("layers.{i}.mlp.fc2.bias", "transformer.h.{i}.mlp.c_proj.bias"),
        Rename("final_norm.weight", "transformer.ln_f.weight"),
        Rename("final_norm.bias", "transformer.ln_f.bias"),
    )
)


def family(model: ModelConfig) -> str:
    """``"gpt2"`` or ``"llama"``: the HF architecture our model's choices match, else an error."""
    if model.num_experts:
        raise TrainerError("converting MoE models to Hugging Face's format is not supported yet")
    gpt2 = (model.norm, model.position, model.mlp, model.bias, model.tied_embeddings) == (
        "layernorm",
        "learned",
        "gelu",
        True,
        True,
    )
    llama = (model.norm, model.position, model.mlp, model.bias, model.tied_embeddings) == (
        "rmsnorm",
        "rotary",
        "swiglu",
        False,
        False,
    )
    if not (gpt2 or llama):
        raise TrainerError("only GPT-2-shaped (layernorm, learned, gelu, bias, tied) and Llama-shaped models convert")
    return "gpt2" if gpt2 else "llama"


def hf_config(model: ModelConfig) -> dict[str, Any]:
    if family(model) == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_embd": model.hidden,
            "n_layer": model.layers,
            "n_head": model.heads,
            "n_positions": model.max_seq_len,
            "n_inner": model.ffn,
            "vocab_size": model.vocab_size,
            "layer_norm_epsilon": model.norm_eps,
            "activation_function": "gelu_new",
            "tie_word_embeddings": True,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": model.hidden,
        "num_hidden_layers": model.layers,
        "num_attention_heads": model.heads,
        "num_key_value_heads": model.num_kv_heads,
        "intermediate_size": model.ffn,
        "vocab_size": model.vocab_size,
        "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": model.norm_eps,
        "rope_theta": model.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    }


def model_from_hf(config: dict[str, Any]) -> ModelConfig:
    kind = config.get("model_type")
    if kind == "gpt2":
        return preset("tiny-gpt2").with_overrides(
            hidden=config["n_embd"], layers=config["n_layer"], heads=config["n_head"], kv_heads=None,
            ffn_hidden=config.get("n_inner") or 4 * config["n_embd"], vocab_size=config["vocab_size"],
            max_seq_len=config["n_positions"], norm_eps=config.get("layer_norm_epsilon", 1e-5),
        )  # fmt: skip
    if kind == "llama":
        return preset("tiny").with_overrides(
            hidden=config["hidden_size"], layers=config["num_hidden_layers"], heads=config["num_attention_heads"],
            kv_heads=config.get("num_key_value_heads"), ffn_hidden=config["intermediate_size"],
            vocab_size=config["vocab_size"], max_seq_len=config.get("max_position_embeddings", 4096),
            norm_eps=config.get("rms_norm_eps", 1e-6), rope_theta=config.get("rope_theta", 10000.0),
        )  # fmt: skip
    raise TrainerError(f"config.json model_type={kind!r}: only 'gpt2' and 'llama' convert")


def _fuse_qkv(state: dict[str, torch.Tensor], layers: int) -> None:
    for i in range(layers):
        for w in ("weight", "bias"):
            parts = [state.pop(f"layers.{i}.attn.{p}.{w}", None) for p in "qkv"]
            if all(p is not None for p in parts):
                state[f"layers.{i}.attn.qkv.{w}"] = torch.cat(parts)


def _split_qkv(state: dict[str, torch.Tensor], model: ModelConfig) -> None:
    d = model.head_dim
    sizes = [model.heads * d, model.num_kv_heads * d, model.num_kv_heads * d]
    for i in range(model.layers):
        for w in ("weight", "bias"):
            fused = state.pop(f"layers.{i}.attn.qkv.{w}", None)
            if fused is not None:
                for p, piece in zip("qkv", fused.split(sizes)):
                    state[f"layers.{i}.attn.{p}.{w}"] = piece.contiguous()


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
            _fuse_qkv(state, model.layers)
        return ckpt.export_hf(state, out, adapter=GPT2 if kind == "gpt2" else LLAMA, config=hf_config(model))


def import_from_hf(hf_dir: str | Path, save: str | Path, *, overrides: dict | None = None) -> Path:
    """A Hugging Face directory as a weights-only checkpoint ``save/step_00000000`` that ``trainer
    train --load`` starts from; the run config saved with it takes the model from ``config.json``."""
    _, config = ckpt.import_hf(hf_dir)
    if config is None:
        raise TrainerError(f"{hf_dir}: config.json is missing")
    model = model_from_hf(config)
    kind = family(model)
    state, _ = ckpt.import_hf(hf_dir, adapter=GPT2 if kind == "gpt2" else LLAMA)
    if kind == "gpt2":
        _split_qkv(state, model)
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

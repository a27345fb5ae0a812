"""``trainer generate``: text from a checkpoint, whatever layout saved it, in one process.

The checkpoint holds the run's configuration; the model is rebuilt from it at TP=PP=1 and its
layout-free tensors are loaded (:func:`trainer.model.model_shards`). Sampling: temperature and top-k,
greedy at temperature 0, from a seeded generator. By default with a KV cache (:mod:`trainer.model.kv_cache`):
the prompt runs once (prefill), then each step runs only the new token. Past ``model.max_seq_len`` tokens the
context is the last ``max_seq_len`` (a sliding window); its positions shift every step, so from there each
step reruns the window, as ``use_cache=False`` does for every step. Both give the same tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

import ckpt
import pstate
from pstate.device import default_device

from .config import parse_run_config
from .data import load_tokenizer
from .errors import TrainerError
from .launch import default_group
from .model import GPTChunk, ModelGroups, build_chunks, weights_state


def generate(
    path: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = 40,
    seed: int = 0,
    use_cache: bool = True,
) -> str:
    """``prompt`` continued by up to ``max_new_tokens`` tokens sampled from the checkpoint's model
    (``use_cache=False``: rerun the whole context for every token)."""
    if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
        raise TrainerError("max_new_tokens and temperature must be >= 0, top_k >= 1")
    found = Path(path) if (Path(path) / "index.json").exists() else ckpt.latest(path)
    if found is None:
        raise TrainerError(f"{path}: no complete checkpoint there")
    device = default_device()
    with default_group(device), pstate.initialize(pstate.ParallelConfig()) as ps:
        cfg = parse_run_config(ckpt.load({"config": ""}, found)["config"], source=f"{found} config")
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        model = cfg.model
        if model.vocab_size is None:
            model = model.with_overrides(vocab_size=tokenizer.vocab_size)
        elif tokenizer.vocab_size > model.vocab_size:
            raise TrainerError(
                f"{cfg.data.tokenizer}: the tokenizer's {tokenizer.vocab_size} ids exceed the model's "
                f"vocab_size={model.vocab_size}"
            )
        (chunk,) = build_chunks(model, ModelGroups.from_state(ps), pp_rank=0, pp=1, seed=cfg.train.seed)
        ckpt.load(weights_state([chunk]), found)
        chunk = chunk.to(device).eval()
        ids = tokenizer.encode(prompt)
        if not ids:
            raise TrainerError("the prompt is empty after tokenizing; give at least one character")
        generator = torch.Generator(device).manual_seed(seed)
        new = decode(
            chunk, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, generator=generator,
            eos_id=tokenizer.eos_id, use_cache=use_cache, vocab_limit=tokenizer.vocab_size,
        )  # fmt: skip
        return prompt + tokenizer.decode(new)


def decode(
    chunk: GPTChunk,
    ids: list[int],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator,
    eos_id: int | None = None,
    use_cache: bool = True,
    vocab_limit: int | None = None,
) -> list[int]:
    """Up to ``max_new_tokens`` token ids sampled after ``ids`` from the whole model ``chunk`` (TP=PP=1),
    stopping before ``eos_id``; the context is the last ``model.max_seq_len`` tokens. ``vocab_limit``:
    only ids below it are sampled (a tokenizer smaller than the model's vocabulary, whose extra rows
    are padding the tokenizer cannot decode)."""
    cfg, limit = chunk.cfg, chunk.cfg.max_seq_len
    vocab = min(cfg.vocab_size, vocab_limit or cfg.vocab_size)
    device = next(chunk.parameters()).device
    caches = chunk.kv_caches(1, min(limit, len(ids) + max_new_tokens)) if use_cache and max_new_tokens else None
    context = list(ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            if caches is not None and len(context) > limit:
                caches = None  # the window slides from here on: its cached keys are at the wrong positions
            step = context[-limit:] if caches is None else context[caches[0].length :]
            logits = chunk(torch.tensor([step], device=device), caches)[-1, 0, :vocab].float()
            token = _sample(logits, temperature, top_k, generator)
            if token == eos_id:
                break
            context.append(token)
    return context[len(ids) :]


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> int:
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        cutoff = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))

"""The GPT model: config and presets, the pipeline chunks built from the parallel packages, the loss,
and the model's tensors as layout-free ``Shard`` pieces (for checkpoints and parity tests)."""

from .backend import apply_backend
from .config import PRESETS, ModelConfig, preset
from .gpt import GPTChunk, build_chunks, lm_loss, tied_embedding_params
from .groups import ModelGroups
from .kv_cache import KVCache
from .shards import model_shards

__all__ = [
    "PRESETS",
    "GPTChunk",
    "KVCache",
    "ModelConfig",
    "ModelGroups",
    "apply_backend",
    "build_chunks",
    "lm_loss",
    "model_shards",
    "preset",
    "tied_embedding_params",
]

"""The GPT model: config and presets, the pipeline chunks built from the parallel packages, the loss,
and the model's tensors as layout-free ``Shard`` pieces (for checkpoints and parity tests)."""

from .backend import apply_backend
from .config import ModelConfig
from .documents import document_positions, documents_tensor
from .gpt import GPTChunk, build_chunks, lm_loss, tied_embedding_params
from .groups import ModelGroups
from .kv_cache import KVCache
from .mla_cache import LatentCache
from .presets import PRESETS, preset
from .shards import model_shards, weights_state

__all__ = [
    "PRESETS",
    "GPTChunk",
    "KVCache",
    "LatentCache",
    "ModelConfig",
    "ModelGroups",
    "apply_backend",
    "build_chunks",
    "document_positions",
    "documents_tensor",
    "lm_loss",
    "model_shards",
    "preset",
    "tied_embedding_params",
    "weights_state",
]

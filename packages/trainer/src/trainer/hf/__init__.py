"""Hugging Face interchange: ``config.json`` to and from :class:`~trainer.model.ModelConfig` for the
families we convert exactly (GPT-2, Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE, Qwen3-MoE, dense
DeepSeek-V3, Mamba-2), and
the tensor name mapping of each."""

from .config import FAMILIES, family, hf_config, model_from_hf
from .names import adapter

__all__ = ["FAMILIES", "adapter", "family", "hf_config", "model_from_hf"]

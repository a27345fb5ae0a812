"""Reading a Hugging Face ``config.json``: every key is either used, checked or known to have no effect;
anything else is refused by name, so a key that changes the math is never dropped."""

from __future__ import annotations

from typing import Any

from ..errors import TrainerError

NO_EFFECT = frozenset(
    {
        "_name_or_path", "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
        "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
        "use_cache", "initializer_range", "output_attentions", "output_hidden_states", "return_dict",
        "output_router_logits", "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
        "is_encoder_decoder", "tokenizer_class", "torchscript", "pretraining_tp", "use_return_dict",
        "tie_encoder_decoder", "prefix", "task_specific_params", "finetuning_task",
    }
)  # fmt: skip


def refuse(key: str, value: Any, rule: str) -> TrainerError:
    """The error for a ``config.json`` key whose value we cannot honour."""
    return TrainerError(f"config.json {key}={value!r}: {rule}")


def expect(config: dict[str, Any], key: str, allowed: tuple, rule: str) -> None:
    """Refuse ``config[key]`` unless it is absent or one of ``allowed``."""
    if key in config and config[key] not in allowed:
        raise refuse(key, config[key], rule)


class Reader:
    """Reads keys of ``config`` and remembers which it has seen."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config, self.seen = config, set(NO_EFFECT)

    def get(self, key: str, default: Any = None) -> Any:
        self.seen.add(key)
        value = self.config.get(key)
        return default if value is None else value

    def need(self, key: str) -> Any:
        self.seen.add(key)
        if self.config.get(key) is None:
            raise TrainerError(f"config.json: {key} is missing")
        return self.config[key]

    def only(self, key: str, allowed: tuple, rule: str) -> None:
        self.seen.add(key)
        expect(self.config, key, allowed, rule)

    def check_all_read(self) -> None:
        unknown = sorted(set(self.config) - self.seen)
        if unknown:
            raise refuse(
                unknown[0],
                self.config[unknown[0]],
                "not understood (it may change the model; refusing rather than dropping it)",
            )

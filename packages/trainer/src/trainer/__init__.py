"""The umbrella: GPT model, data pipeline, training loop, inference and the ``trainer`` command.

Subpackages: :mod:`trainer.model` (the model on every parallelism), :mod:`trainer.data` (tokenizers,
datasets, sampling), :mod:`trainer.config` (the run configuration), :mod:`trainer.train` (the loop).
The names below load on first use, so ``trainer preprocess`` starts without importing the model stack.
Training is ``trainer.train.train(cfg)``, sampling ``trainer.generate.generate(path, prompt)``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "RunConfig": "trainer.config",
    "load_run_config": "trainer.config",
    "check_run": "trainer.config",
    "ModelConfig": "trainer.model",
    "preset": "trainer.model",
    "TrainerError": "trainer.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")

"""Sharded, atomic, async distributed checkpoints that load into any other parallel layout.

``save(state, path, group=...)`` writes each rank's pieces of a nested state dict (``pstate.Shard``
pieces, replicated tensors, ``PerRank`` values, JSON values) as safetensors files plus a JSON index;
``load(state, path, group=...)`` fills a state described in any other layout from them. ``latest``
finds the newest complete checkpoint, ``AsyncSaver`` saves in the background, :mod:`ckpt.convert`
maps state dicts to and from Hugging Face's format, and ``ckpt inspect PATH`` shows a checkpoint.
"""

from .convert import Adapter, Rename, Split, Stack, Transpose, export_hf, import_hf
from .errors import CheckpointError
from .files import latest, step_dir
from .inspection import inspect, verify
from .load import load
from .save import AsyncSaver, SaveHandle, save
from .tree import PerRank

__all__ = [
    "Adapter",
    "AsyncSaver",
    "CheckpointError",
    "PerRank",
    "Rename",
    "SaveHandle",
    "Split",
    "Stack",
    "Transpose",
    "export_hf",
    "import_hf",
    "inspect",
    "latest",
    "load",
    "save",
    "step_dir",
    "verify",
]

"""Streaming load: fill a rank's model pieces straight from a Hugging Face folder, reading only the slices
that rank holds (``safetensors``' ``safe_open(...).get_slice``), so no process holds the whole model.

Each named piece (:func:`trainer.model.shards.model_pieces`: layout-free name, global shape, this
rank's offsets) is looked up through the family's name mapping: a renamed tensor is sliced directly, a
transposed one (GPT-2) with its indices swapped, an expert of a stacked tensor one per expert, and a
part the layer declares as rows of a fused tensor (``Piece.fused``) that the family stores fused
(GPT-2's ``c_attn``, Mamba-2's ``in_proj`` and ``conv1d``) at its rows of that tensor. Shapes are
checked against the file before any data is read; a missing tensor or file is named.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ckpt import Rename, Stack, Transpose
from ckpt.convert import HF_INDEX, HF_SINGLE, Template

from ..errors import TrainerError
from ..model import GPTChunk, ModelConfig
from ..model.shards import expert_bias_shards, model_pieces
from .names import adapter, mapped, unsqueezed_dim

FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
"""The safetensors dtypes a weight may have (converted to the model's dtype on load)."""


class _Files:
    """The folder's tensors by name, opened lazily (one handle per file)."""

    def __init__(self, root: Path) -> None:
        self.root, self.handles = root, {}
        if (root / HF_INDEX).is_file():
            self.where = json.loads((root / HF_INDEX).read_text())["weight_map"]
        elif (root / HF_SINGLE).is_file():
            self.handles[HF_SINGLE] = _open(root / HF_SINGLE)
            self.where = dict.fromkeys(self.handles[HF_SINGLE].keys(), HF_SINGLE)
        else:
            raise TrainerError(f"{root}: neither {HF_INDEX} nor {HF_SINGLE} is there")

    def slice(self, name: str):
        if name not in self.where:
            raise TrainerError(f"{self.root}: tensor {name!r} is missing")
        file = self.where[name]
        if file not in self.handles:
            path = self.root / file
            if not path.is_file():
                raise TrainerError(f"{path}: data file is missing (named by {HF_INDEX})")
            self.handles[file] = _open(path)
        return self.handles[file].get_slice(name)


def _open(path: Path):
    try:
        return safe_open(str(path), "pt")
    except Exception as error:  # safetensors raises its own error types for a damaged file
        raise TrainerError(f"{path}: not a readable safetensors file ({error})") from None


def hf_tensor_names(hf_dir: str | Path) -> list[str]:
    """The names of the tensors stored in a Hugging Face folder (read from the headers only)."""
    return list(_Files(Path(hf_dir)).where)


def _read(files: _Files, name: str, global_shape: tuple[int, ...], index: tuple[slice, ...]) -> torch.Tensor:
    part = files.slice(name)
    shape = tuple(part.get_shape())
    if shape != tuple(global_shape):
        raise TrainerError(f"{files.root}: {name} has shape {shape}, expected {tuple(global_shape)}")
    if part.get_dtype() not in FLOAT_DTYPES:
        raise TrainerError(f"{files.root}: {name} has dtype {part.get_dtype()}, expected one of {FLOAT_DTYPES}")
    return part[index]


def _source(files: _Files, rules, name: str, shape: tuple, offsets: tuple, size: tuple) -> torch.Tensor:
    """The block ``offsets``/``size`` of our full tensor ``name`` (global ``shape``), read from the files."""
    index = tuple(slice(o, o + n) for o, n in zip(offsets, size))
    for rule in rules:
        fields = Template(rule.ours).match(name)
        if fields is None:
            continue
        if isinstance(rule, Stack):
            theirs = Template(rule.theirs)
            parts = [
                _read(files, theirs.format({**fields, "e": str(e)}), shape[1:], index[1:])
                for e in range(offsets[0], offsets[0] + size[0])
            ]
            return torch.stack(parts)
        theirs = Template(rule.theirs).format(fields)
        if isinstance(rule, Transpose):
            return _read(files, theirs, shape[::-1], index[::-1]).t()
        if isinstance(rule, Rename):
            return _read(files, theirs, shape, index)
    raise TrainerError(f"no Hugging Face tensor holds {name!r}")


def load_hf_pieces(chunks: list[GPTChunk], hf_dir: str | Path) -> None:
    """Copy into ``chunks``' parameters their pieces of the model in ``hf_dir`` (its family's names),
    reading only those slices, and into the MoE routers' expert biases theirs."""
    if not chunks:
        return
    model: ModelConfig = chunks[0].cfg
    files, rules = _Files(Path(hf_dir)), adapter(model).rules
    with torch.no_grad():
        for piece in model_pieces(chunks):
            target = piece.of(piece.param.data)
            name, shape, offsets, size = piece.name, piece.global_shape, piece.offsets, tuple(target.shape)
            if piece.fused is not None and not mapped(rules, name):  # stored as rows of a fused tensor
                name, shape = piece.fused.name, piece.fused.global_shape
                offsets = (offsets[0] + piece.fused.first, *offsets[1:])
            dim = unsqueezed_dim(name, model)
            if dim is not None:
                shape, offsets, size = ((*t[:dim], one, *t[dim:]) for t, one in ((shape, 1), (offsets, 0), (size, 1)))
            data = _source(files, rules, name, shape, offsets, size)
            target.copy_((data if dim is None else data.squeeze(dim)).to(target.dtype))
        for name, bias in expert_bias_shards(chunks).items():  # buffers: whole on every rank
            bias.data.copy_(_source(files, rules, name, bias.global_shape, bias.offsets, tuple(bias.shape)))

"""Conversion hooks: an ``Adapter`` of invertible rules mapping our state dict to another naming
(Hugging Face's), and export/import of the HF format (safetensors file(s) plus ``config.json``).

Rules name keys with templates such as ``"layers.{i}.attn.qkv.weight"``: ``{i}`` matches one
dot-free part and is carried to the other side. ``Rename`` renames, ``Transpose`` renames and
transposes a 2-D weight (GPT-2 stores ``[in, out]``), ``Split`` cuts a fused tensor (QKV, gate/up)
into parts along a dimension and fuses them back on import, ``Stack`` unstacks a tensor of experts
into one tensor per expert (``{e}`` in the other name numbers them). Every rule works in both directions, so
``adapter.from_hf(adapter.to_hf(state)) == state``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import files
from .errors import CheckpointError

Tensors = dict[str, torch.Tensor]
HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"


class Template:
    """``"layers.{i}.w"``: matching a key yields ``{"i": ...}``; formatting fills the fields back in."""

    def __init__(self, text: str):
        self.text = text
        parts = re.split(r"\{(\w+)\}", text)
        self.fields = parts[1::2]
        pattern = "".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>[^.]+)" for k, p in enumerate(parts))
        self.regex = re.compile(pattern + r"\Z")

    def match(self, key: str) -> dict[str, str] | None:
        m = self.regex.match(key)
        return None if m is None else m.groupdict()

    def format(self, fields: dict[str, str]) -> str:
        missing = set(self.fields) - set(fields)
        if missing:
            raise CheckpointError(f"template {self.text!r} needs fields {sorted(missing)}")
        return self.text.format(**fields)


@dataclass(frozen=True)
class Rename:
    """``ours`` is called ``theirs`` on the other side."""

    ours: str
    theirs: str

    def apply(self, src: Tensors, reverse: bool) -> Tensors:
        a, b = (self.theirs, self.ours) if reverse else (self.ours, self.theirs)
        return {b2: t for b2, t in _take(src, a, b, self._map)}

    @staticmethod
    def _map(t: torch.Tensor) -> torch.Tensor:
        return t


@dataclass(frozen=True)
class Transpose(Rename):
    """Renamed, and the 2-D weight transposed (both directions)."""

    @staticmethod
    def _map(t: torch.Tensor) -> torch.Tensor:
        if t.dim() != 2:
            raise CheckpointError(f"Transpose needs a 2-D tensor, got shape {tuple(t.shape)}")
        return t.t().contiguous()


@dataclass(frozen=True)
class Split:
    """Our fused ``ours`` is ``parts`` on the other side, cut along ``dim`` by ``sizes`` (equal if ``None``)."""

    ours: str
    parts: tuple[str, ...]
    dim: int = 0
    sizes: tuple[int, ...] | None = None

    def apply(self, src: Tensors, reverse: bool) -> Tensors:
        return self._fuse(src) if reverse else self._split(src)

    def _split(self, src: Tensors) -> Tensors:
        ours, out = Template(self.ours), {}
        for key in [k for k in src if ours.match(k) is not None]:
            fields, fused = ours.match(key), src.pop(key)
            n = fused.shape[self.dim]
            sizes = list(self.sizes) if self.sizes else [n // len(self.parts)] * len(self.parts)
            if sum(sizes) != n or len(sizes) != len(self.parts):
                raise CheckpointError(f"{key!r}: dimension {self.dim} of size {n} cannot be split into {sizes}")
            for part, piece in zip(self.parts, torch.split(fused, sizes, dim=self.dim)):
                out[Template(part).format(fields)] = piece.contiguous()
        return out

    def _fuse(self, src: Tensors) -> Tensors:
        first, out = Template(self.parts[0]), {}
        for key in [k for k in src if first.match(k) is not None]:
            fields = first.match(key)
            names = [Template(p).format(fields) for p in self.parts]
            missing = [n for n in names if n not in src]
            if missing:
                raise CheckpointError(f"cannot fuse {self.ours!r}: {missing} are missing")
            pieces = [src.pop(n) for n in names]
            if self.sizes and [p.shape[self.dim] for p in pieces] != list(self.sizes):
                raise CheckpointError(f"{names}: sizes along dimension {self.dim} are not {list(self.sizes)}")
            out[Template(self.ours).format(fields)] = torch.cat(pieces, dim=self.dim)
        return out


@dataclass(frozen=True)
class Stack:
    """Our ``ours`` (``[n, ...]``) is ``n`` tensors ``theirs`` on the other side, numbered by ``{e}``
    (``0`` to ``n-1``, all of them present on import)."""

    ours: str
    theirs: str

    def apply(self, src: Tensors, reverse: bool) -> Tensors:
        return self._stack(src) if reverse else self._unstack(src)

    def _unstack(self, src: Tensors) -> Tensors:
        ours, theirs, out = Template(self.ours), Template(self.theirs), {}
        for key in [k for k in src if ours.match(k) is not None]:
            fields = ours.match(key)
            for e, piece in enumerate(src.pop(key).unbind(0)):
                out[theirs.format({**fields, "e": str(e)})] = piece.contiguous()
        return out

    def _stack(self, src: Tensors) -> Tensors:
        ours, theirs = Template(self.ours), Template(self.theirs)
        found: dict[str, dict[int, str]] = {}
        for key in list(src):
            fields = theirs.match(key)
            if fields is not None:
                e = fields.pop("e")
                if not e.isdigit():
                    continue
                found.setdefault(ours.format(fields), {})[int(e)] = key
        out = {}
        for name, keys in found.items():
            if sorted(keys) != list(range(len(keys))):
                missing = sorted(set(range(max(keys) + 1)) - set(keys))
                raise CheckpointError(f"{name!r}: experts {missing} of {self.theirs!r} are missing")
            out[name] = torch.stack([src.pop(keys[e]) for e in range(len(keys))])
        return out


Rule = Rename | Transpose | Split | Stack


@dataclass(frozen=True)
class Adapter:
    """Rules applied in order; keys no rule matches are an error unless ``passthrough``."""

    rules: tuple[Rule, ...]
    passthrough: bool = False

    def to_hf(self, state: Tensors) -> Tensors:
        """Our state dict in the other naming."""
        return self._apply(state, reverse=False)

    def from_hf(self, state: Tensors) -> Tensors:
        """The other naming's state dict in ours."""
        return self._apply(state, reverse=True)

    def _apply(self, state: Tensors, reverse: bool) -> Tensors:
        src, out = dict(state), {}
        for rule in self.rules:
            for key, t in rule.apply(src, reverse).items():
                if key in out:
                    raise CheckpointError(f"two rules produce {key!r}")
                out[key] = t
        if src and not self.passthrough:
            raise CheckpointError(f"no rule matches {sorted(src)}")
        clash = set(src) & set(out)
        if clash:
            raise CheckpointError(f"unmatched keys {sorted(clash)} clash with produced ones")
        return {**out, **src}


def _take(src: Tensors, a: str, b: str, fn) -> list[tuple[str, torch.Tensor]]:
    """Pop the keys of ``src`` matching template ``a``, renamed by template ``b`` and mapped by ``fn``."""
    ta, tb = Template(a), Template(b)
    found = [(k, ta.match(k)) for k in list(src)]
    return [(tb.format(f), fn(src.pop(k))) for k, f in found if f is not None]


def export_hf(
    state: Tensors,
    out_dir: str | os.PathLike,
    *,
    adapter: Adapter | None = None,
    config: dict | None = None,
    max_shard_bytes: int | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write full tensors as a Hugging Face checkpoint: ``model.safetensors`` (or numbered shards and
    ``model.safetensors.index.json`` past ``max_shard_bytes``), ``config.json`` and ``extra_files``
    (name to contents: a tokenizer, ``generation_config.json``); atomically."""
    out = Path(out_dir).absolute()
    if out.exists():
        raise CheckpointError(f"{out} already exists")
    hf = adapter.to_hf(state) if adapter is not None else dict(state)
    hf = {k: t.detach().to("cpu").contiguous().clone() for k, t in hf.items()}
    groups: list[list[str]] = [[]]
    size = 0
    for key in sorted(hf):
        nbytes = hf[key].numel() * hf[key].element_size()
        if max_shard_bytes is not None and groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    tmp = files.temporary_dir(out, files.new_token())
    tmp.mkdir(parents=True)
    try:
        names = (
            [HF_SINGLE]
            if len(groups) == 1
            else [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
        )
        for name, keys in zip(names, groups):
            save_file({k: hf[k] for k in keys}, str(tmp / name), metadata={"format": "pt"})
        if len(groups) > 1:
            total = sum(t.numel() * t.element_size() for t in hf.values())
            weight_map = {k: n for n, keys in zip(names, groups) for k in keys}
            files.write_json(tmp / HF_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        if config is not None:
            files.write_json(tmp / "config.json", config)
        for name, data in (extra_files or {}).items():
            if "/" in name or name.startswith(".") or name in (HF_SINGLE, HF_INDEX, "config.json"):
                raise CheckpointError(f"extra file name {name!r}: must be a plain new file name")
            (tmp / name).write_bytes(data)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def import_hf(path: str | os.PathLike, *, adapter: Adapter | None = None) -> tuple[Tensors, dict | None]:
    """Read a Hugging Face checkpoint directory: (state dict in our naming, ``config.json`` or ``None``)."""
    root = Path(path)
    if (root / HF_INDEX).is_file():
        weight_map = json.loads((root / HF_INDEX).read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    elif (root / HF_SINGLE).is_file():
        names = [HF_SINGLE]
    else:
        raise CheckpointError(f"{root}: neither {HF_INDEX} nor {HF_SINGLE} is there")
    hf: Tensors = {}
    for name in names:
        target = files.resolve_member(root, name)
        if not target.is_file():
            raise CheckpointError(f"{target}: data file is missing")
        hf.update(load_file(str(target)))
    config_path = root / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else None
    return (adapter.from_hf(hf) if adapter is not None else hf), config


__all__ = ["Adapter", "Rename", "Split", "Stack", "Template", "Transpose", "export_hf", "import_hf"]

"""TOML files to a :class:`RunConfig` and back; sections ``model``, ``parallel``, ``train``, ``optim``, ``data``.

``[model]`` may name a ``preset`` and override any of its fields, or describe a whole model (as
:func:`to_toml` writes it). Unknown sections and fields are
refused by name, so a typo cannot be silently ignored.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import tomllib

from pstate import ParallelConfig, ParallelConfigError

from ..data.build import DataConfig
from ..errors import TrainerError
from ..model import ModelConfig, preset
from .fields import check_types
from .run import OptimConfig, RunConfig, TrainConfig

SECTIONS = {"parallel": ParallelConfig, "train": TrainConfig, "optim": OptimConfig, "data": DataConfig}


def load_run_config(path: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> RunConfig:
    """The run described by the TOML file at ``path`` (if any), then ``overrides[section][field]``."""
    if path is None:
        return parse_run_config("", overrides)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise TrainerError(f"config file {path}: not found") from None
    return parse_run_config(text, overrides, source=f"config file {path}")


def parse_run_config(
    text: str, overrides: dict[str, dict[str, Any]] | None = None, *, source: str = "config"
) -> RunConfig:
    """The run described by TOML ``text`` (as :func:`to_toml` writes it), then ``overrides``."""
    try:
        raw: dict[str, dict[str, Any]] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise TrainerError(f"{source}: invalid TOML: {error}") from None
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {}).update(values)
    unknown = sorted(set(raw) - set(SECTIONS) - {"model"})
    if unknown:
        raise TrainerError(f"config: unknown section(s) {unknown}; sections are {['model', *SECTIONS]}")
    try:
        model = _model(dict(raw.get("model", {})))
        check_types(model, "model")
    except TypeError as error:
        raise TrainerError(f"config [model]: {error}") from None
    sections = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name, {})
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(values) - known)
        if bad:
            raise TrainerError(f"config [{name}]: unknown field(s) {bad}; known fields are {sorted(known)}")
        try:
            sections[name] = cls(**values)
        except (TypeError, ParallelConfigError) as error:
            raise TrainerError(f"config [{name}]: {error}") from None
    return RunConfig(model=model, **sections)


def _model(fields: dict[str, Any]) -> ModelConfig:
    """``preset`` (default ``tiny``) with the other fields as overrides; without a preset, a section that
    gives ``hidden``, ``layers`` and ``heads`` is a whole model (what :func:`to_toml` writes), so fields
    it leaves out keep the dataclass defaults rather than a preset's."""
    if "preset" not in fields and {"hidden", "layers", "heads"} <= set(fields):
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise TrainerError(f"model.{unknown[0]}: no such field; known fields are {sorted(known)}")
        return ModelConfig(**fields)
    return preset(fields.pop("preset", "tiny")).with_overrides(**fields)


def to_toml(cfg: RunConfig) -> str:
    """The resolved configuration as TOML (``None`` fields are left out: TOML has no null)."""
    lines: list[str] = []
    for name in ("model", *SECTIONS):
        lines.append(f"[{name}]")
        for f in dataclasses.fields(getattr(cfg, name)):
            value = getattr(getattr(cfg, name), f.name)
            if value is not None:
                lines.append(f"{f.name} = {_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

"""What each configuration field means, read from the sections' own source, for ``--help`` and the CLI reference.

A field's documentation is the string literal written under it in its dataclass (an attribute docstring);
``field(metadata={"help": ...})`` works too. The command-line help and the generated reference page are built
from these, so they cannot drift from the code; a test requires every field of every section to have one.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap
from functools import cache
from typing import Any

from cp_ring import KERNEL_NAMES
from pp_sched import SCHEDULES
from pstate import ParallelConfig

from ..data.build import DataConfig
from ..model import ModelConfig
from ..model.config import CHOICES as MODEL_CHOICES
from ..model.presets import PRESETS
from .run import CP_ATTENTION, DECAYS, FP8_RECIPES, ON_NAN, PRECISIONS, OptimConfig, RunConfig, TrainConfig

#: The sections of a run, in the order of the TOML file and the reference.
SECTION_TYPES: dict[str, type] = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "train": TrainConfig,
    "optim": OptimConfig,
    "data": DataConfig,
}

#: The pseudo-field ``model.preset``: a named model whose fields the other ``model.*`` fields override.
PRESET_DOC = "named model shape; the other model.* fields override its values"


def choices(section: str, name: str) -> tuple[Any, ...] | None:
    """The values a field accepts when they form a fixed set, else ``None``."""
    table: dict[str, tuple[Any, ...]] = {
        "model.preset": tuple(PRESETS),
        **{f"model.{k}": tuple(v) for k, v in MODEL_CHOICES.items()},
        "train.precision": PRECISIONS,
        "train.fp8_recipe": FP8_RECIPES,
        "train.zero": (0, 1, 2, 3),
        "train.recompute": ("full", "selective"),
        "train.on_nan": ON_NAN,
        "train.cp_attention": CP_ATTENTION,
        "train.cp_kernel": KERNEL_NAMES,
        "train.pipeline_schedule": tuple(SCHEDULES),
        "optim.decay": DECAYS,
    }
    return table.get(f"{section}.{name}")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: documentation}`` of a dataclass: the string under each field, or its ``metadata["help"]``."""
    docs: dict[str, str] = {}
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (a frozen build): metadata only
        tree = None
    if tree is not None:
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, after in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split()).rstrip(".")
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            docs.setdefault(f.name, str(f.metadata["help"]))
    return docs


def default(section: str, name: str) -> Any:
    """The value a field has when nothing sets it (``model.*``: the default preset's)."""
    if section == "model" and name == "preset":
        return "tiny"
    return getattr(getattr(RunConfig(), section), name)


def show(value: Any) -> str:
    """A value as a user writes it on the command line."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)


def field_help(section: str, name: str) -> str:
    """One line for ``--help``: what the field does, its choices and its default."""
    doc = PRESET_DOC if (section, name) == ("model", "preset") else field_docs(SECTION_TYPES[section]).get(name, "")
    extra = []
    allowed = choices(section, name)
    if allowed:
        extra.append("choices: " + ", ".join(show(v) for v in allowed))
    if "default" not in doc:
        extra.append(f"default: {show(default(section, name))}")
    text = f"{doc} ({'; '.join(extra)})" if extra else doc
    return text.replace("%", "%%")  # argparse formats help strings


def fields_table() -> list[tuple[str, str, str, str]]:
    """``(section.field, type, default, documentation)`` for every field of every section."""
    rows = [("model.preset", "str", "tiny", PRESET_DOC + "; choices: " + ", ".join(PRESETS))]
    for section, cls in SECTION_TYPES.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            value = "(the preset's)" if section == "model" else show(default(section, f.name))
            doc = docs.get(f.name, "")
            allowed = choices(section, f.name)
            if allowed:
                doc += "; choices: " + ", ".join(show(v) for v in allowed)
            rows.append((f"{section}.{f.name}", kind, value, doc))
    return rows

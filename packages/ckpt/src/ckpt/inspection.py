"""Reading a checkpoint's index for people: what it holds, how it was laid out, and whether it is intact."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from safetensors import safe_open

from . import files
from .errors import CheckpointError
from .plan import parse_dtype


def verify(path: str | os.PathLike) -> list[str]:
    """Every problem with the checkpoint at ``path``: each indexed file's path, size and checksum."""
    path = Path(path)
    try:
        index = files.read_index(path)
    except CheckpointError as e:
        return [str(e)]
    problems = []
    for name, record in sorted(index["files"].items()):
        try:
            files.verify_file(path, name, record)
        except CheckpointError as e:
            problems.append(str(e))
    stored: dict[str, set[str]] = {}
    for key, head in sorted(index["tensors"].items()):
        for piece in head["pieces"]:
            if piece["file"] not in index["files"]:
                problems.append(f"{key!r}: a piece names the file {piece['file']!r}, absent from the index")
            stored.setdefault(piece["file"], set()).add(piece["name"])
    for by_rank in index["rank_tensors"].values():
        for entry in by_rank.values():
            stored.setdefault(entry["file"], set()).add(entry["name"])
    if not problems:
        problems.extend(_unreadable(path, stored))
    return problems


def _unreadable(root: Path, stored: dict[str, set[str]]) -> list[str]:
    """Each data file safetensors cannot open, or that lacks a tensor its index places there."""
    problems = []
    for name, keys in sorted(stored.items()):
        target = root / name
        try:
            with safe_open(str(target), framework="pt") as f:
                missing = sorted(keys - set(f.keys()))
                for key in sorted(keys - set(missing)):
                    f.get_slice(key).get_shape()
        except Exception as e:  # safetensors raises its own error types for a bad header
            problems.append(f"{target}: safetensors cannot read it ({type(e).__name__}: {e})")
            continue
        if missing:
            problems.append(f"{target}: lacks the tensor(s) {missing} that the index places there")
    return problems


def inspect(path: str | os.PathLike) -> dict:
    """A summary of the checkpoint at ``path``: its tensors, per-rank tensors, values, layout and files."""
    path = Path(path)
    index = files.read_index(path)
    tensors = []
    for key, head in sorted(index["tensors"].items()):
        size = parse_dtype(head["dtype"]).itemsize
        stored = sum(
            (p["flat_range"][1] - p["flat_range"][0]) if p["flat_range"] else math.prod(p["shape"])
            for p in head["pieces"]
        )
        tensors.append(
            {
                "name": key,
                "dtype": head["dtype"],
                "global_shape": head["global_shape"],
                "pieces": len(head["pieces"]),
                "bytes": stored * size,
            }
        )
    return {
        "path": str(path),
        "world_size": index["world_size"],
        "layout": index["layout"],
        "tensors": tensors,
        "rank_tensors": {k: sorted(map(int, v)) for k, v in sorted(index["rank_tensors"].items())},
        "values": index["values"],
        "rank_values": index["rank_values"],
        "files": {n: r["size"] for n, r in sorted(index["files"].items())},
    }


def render(summary: dict, problems: list[str] | None) -> str:
    """``inspect``'s summary (and ``verify``'s problems, when checked) as text."""
    lines = [f"checkpoint {summary['path']} (saved by {summary['world_size']} ranks)"]
    lines.append(f"layout: {json.dumps(summary['layout'])}")
    width = max([len(t["name"]) for t in summary["tensors"]] + [6])
    lines.append(f"{'tensor':<{width}}  {'dtype':<9} {'global shape':<18} {'pieces':>6} {'bytes':>12}")
    for t in summary["tensors"]:
        shape = str(tuple(t["global_shape"]))
        lines.append(f"{t['name']:<{width}}  {t['dtype']:<9} {shape:<18} {t['pieces']:>6} {t['bytes']:>12}")
    for key, ranks in summary["rank_tensors"].items():
        lines.append(f"per-rank tensor {key}: ranks {ranks}")
    for key, value in summary["values"].items():
        lines.append(f"value {key} = {json.dumps(value)}")
    for key, by_rank in summary["rank_values"].items():
        lines.append(f"per-rank value {key}: {json.dumps(by_rank)}")
    total = sum(summary["files"].values())
    lines.append(f"files: {len(summary['files'])}, {total} bytes on disk")
    for name, size in summary["files"].items():
        lines.append(f"  {name} {size}")
    if problems is not None:
        lines.append("checksums and contents: ok" if not problems else "checksums and contents: FAILED")
        lines.extend(f"  {p}" for p in problems)
    return "\n".join(lines)

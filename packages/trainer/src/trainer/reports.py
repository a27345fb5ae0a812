"""What the ranks of a local launch leave for the launcher in its run directory: each failed rank's one-line
error with its exit code, and rank 0's per-step records."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_error(run_dir: str | os.PathLike, rank: int, code: int, message: str) -> None:
    """Record why ``rank`` is about to exit with ``code`` (the first report of a rank wins)."""
    path = Path(run_dir) / f"error-{rank}.json"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rank": rank, "code": code, "message": message}))
        os.replace(tmp, path)


def read_errors(run_dir: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """The errors the ranks recorded, by rank."""
    out = {}
    for path in sorted(Path(run_dir).glob("error-*.json")):
        doc = json.loads(path.read_text())
        out[int(doc["rank"])] = doc
    return out


def write_records(run_dir: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    path = Path(run_dir) / "records.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(records))
    os.replace(tmp, path)


def read_records(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / "records.json"
    return json.loads(path.read_text()) if path.exists() else []

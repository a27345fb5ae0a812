"""Which checkpoints a starting run tries to resume from, newest first, after removing what interrupted
saves left behind.

``--load`` naming one checkpoint (a directory holding ``index.json``) is the only candidate: if it cannot be
loaded the run stops, naming the file. Otherwise (``--load`` or ``--save`` naming a directory of
checkpoints) the candidates are its intact checkpoints, newest first; one whose index or data files are
missing is skipped with a warning naming it, and the loop skips one whose data fails its checksum the same
way, so a run resumes from the newest checkpoint that loads.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import ckpt

from ..config import TrainConfig


def checkpoints_to_try(train: TrainConfig, note: Callable[[str], None], *, first_rank: bool) -> list[Path]:
    """The checkpoints to resume from, in order; the first rank first cleans ``--save`` (with a log line
    per removed directory)."""
    if first_rank and train.save:
        for removed in ckpt.clean(train.save):
            note(f"removed {removed}: left by an interrupted save")
    root = train.load or train.save
    if not root:
        return []
    path = Path(root)
    if (path / ckpt.files.INDEX).exists():
        return [path]
    return ckpt.intact(path, warn=note)

"""``trainer plan --check``: dry-run the planner's layouts (ranks 0, the middle one and the last) and
report each rank's figures beside the planner's estimate, so a proposed layout is known to build.

A layout the trainer refuses is one line naming the rule (:class:`~trainer.errors.TrainerError`, exit 2).
The model is built on the meta device unless it fits here (:func:`trainer.train.dry_run.dry_run`'s
``"auto"``), so any rank of a cluster-sized layout is checked on one machine.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import check_run
from ..errors import TrainerError
from .estimate import Estimate


def size(nbytes: float) -> str:
    """Bytes in the largest binary unit that keeps the figure >= 1."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} B"


def check_layouts(found: list[Estimate], *, device: str = "auto") -> list[dict[str, Any]]:
    """Dry-run ranks 0, ``world // 2`` and ``world - 1`` of each layout of ``found``; the reports, one per
    layout: the planner's parameter/gradient/optimizer bytes per GPU and each rank's dry-run figures."""
    from ..train.dry_run import dry_run

    out = []
    for result in found:
        layout, work = result.layout, result.work
        cfg = layout.run_config(work)
        world = layout.world
        try:
            check_run(cfg, world)
        except TrainerError as e:
            raise TrainerError(f"plan --check: layout {describe(layout)} fails its checks: {e}") from None
        ranks = sorted({0, world // 2, world - 1})
        reports = [dry_run(cfg, world, r, device=device, step=False) for r in ranks]
        planned = {k: int(v) for k, v in result.memory.parts.items() if k in ("parameters", "gradients", "optimizer")}
        out.append({"layout": describe(layout), "planned": planned, "ranks": reports})
    return out


def describe(layout: Any) -> str:
    """A layout as the flags that pick it."""
    fields = dataclasses.asdict(layout)
    parts = [f"{k}={v}" for k, v in fields.items() if v not in (None, False) and k != "world"]
    return f"world={layout.world} " + " ".join(parts)


def render_checks(checks: list[dict[str, Any]]) -> str:
    """One block per layout: a line per dry-run rank (coordinates, bytes in GiB, setup seconds)."""
    lines = []
    for c in checks:
        planned = ", ".join(f"{k} {size(v)}" for k, v in c["planned"].items())
        lines.append(f"check {c['layout']}: built on every checked rank (planner, per GPU: {planned})")
        for r in c["ranks"]:
            b = r["bytes"]
            coords = " ".join(f"{k}{v}" for k, v in r["coords"].items())
            setup = sum(r["seconds"].values())
            lines.append(
                f"  rank {r['rank']} ({coords}, {r['device']}): parameters {size(b['parameters'])}, "
                f"gradients {size(b['gradients'])}, optimizer {size(b['optimizer'])}, "
                f"buffers {size(b['buffers'])}; checkpoint {r['checkpoint']['pieces']} pieces "
                f"{size(r['checkpoint']['bytes'])}; dry run {setup:.1f} s"
            )
    return "\n".join(lines)

"""Checks of the package table in DESIGN.md that a package's own tests can run."""

from __future__ import annotations

import json
import subprocess
import sys

#: Import names of the project's packages, bottom of the table first.
PROJECT_PACKAGES = ("pstate", "tp_layers", "pp_sched", "dp_shard", "moe_dispatch", "cp_ring", "ckpt", "trainer")


def loaded_project_packages(package: str) -> set[str]:
    """The other project packages that ``import package`` loads, in a fresh interpreter (so that
    nothing the test process imported earlier hides an import)."""
    code = (
        f"import sys, json; import {package}; "
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(PROJECT_PACKAGES)!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out)) - {package}

"""The package table of DESIGN.md holds: arrows only point down, and each package declares exactly
the third-party distributions it imports (so it installs and runs with only those). A module no installed
distribution provides passes only as an extra of the same name (the GPU-only ``gpu-*`` extras: Transformer
Engine, DeepEP)."""

import ast
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = sorted(p for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").exists())


def lint_imports(pythonpath: list[Path]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(lint), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )


def test_import_contracts_are_kept():
    result = lint_imports([p / "src" for p in PACKAGES])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("package", "imports"),
    [("pstate", "trainer"), ("tp_layers", "pp_sched"), ("moe_dispatch", "ckpt"), ("ckpt", "trainer")],
)
def test_import_contracts_catch_an_upward_or_sideways_import(tmp_path, package, imports):
    roots = []
    for pkg in PACKAGES:
        copy = tmp_path / pkg.name
        shutil.copytree(pkg / "src", copy)
        roots.append(copy)
    (next(r for r in roots if (r / package).is_dir()) / package / "_violation.py").write_text(f"import {imports}\n")
    result = lint_imports(roots)
    assert result.returncode != 0
    assert f"{package}._violation -> {imports}" in result.stdout


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalise(re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0])


def imported_top_level(src: Path) -> dict[str, set[str]]:
    """Top-level module name -> the files of ``src`` that import it (absolute imports only)."""
    found: dict[str, set[str]] = {}
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(src)))
    return found


@pytest.mark.parametrize("package_dir", PACKAGES, ids=lambda p: p.name)
def test_declares_exactly_the_distributions_it_imports(package_dir):
    project = tomllib.loads((package_dir / "pyproject.toml").read_text())["project"]
    declared = {requirement_name(r) for r in project.get("dependencies", [])}
    extras = {requirement_name(r) for reqs in project.get("optional-dependencies", {}).values() for r in reqs}
    local = {p.name.replace("-", "_"): p.name for p in PACKAGES}
    dists = packages_distributions()
    src = package_dir / "src"
    own = {p.name for p in src.iterdir() if p.is_dir()}
    imported: dict[str, set[str]] = {}
    for module, files in imported_top_level(src).items():
        if module in sys.stdlib_module_names or module in own:
            continue
        names = [local[module]] if module in local else dists.get(module)
        if not names and normalise(module) in extras:  # an optional GPU-only package, not installable here
            names = [module]
        assert names, (
            f"{package_dir.name} imports {module!r} ({sorted(files)}), which no installed distribution provides"
        )
        imported.setdefault(normalise(names[0]), set()).update(files)
    undeclared = {d: sorted(f) for d, f in imported.items() if d not in declared | extras}
    assert not undeclared, f"{package_dir.name} imports distributions it does not declare: {undeclared}"
    unused = declared - set(imported)
    assert not unused, f"{package_dir.name} declares dependencies it never imports: {sorted(unused)}"

"""Sessions: ``tests`` (everything, one environment), one per package (that package and its declared
dependencies only), ``lint`` (ruff and the import contracts), ``integration`` and ``docs``.

Every install is held to ``constraints.txt`` (torch==2.13.0). Set ``TORCH_INDEX_URL`` (as the GitHub
workflow does) to take the CPU build of torch from that index first.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nox
import tomllib

ROOT = Path(__file__).parent
CONSTRAINTS = ("-c", str(ROOT / "constraints.txt"))
PACKAGES = {p.name: p for p in sorted((ROOT / "packages").iterdir()) if (p / "pyproject.toml").is_file()}
TEST_TOOLS = ("pytest", "pytest-xdist", "hypothesis")

nox.options.sessions = ["lint", "tests"]
nox.options.default_venv_backend = "venv"


def dependencies(dist: str) -> list[str]:
    """``dist`` and the project packages it depends on, transitively, dependencies first."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        project = tomllib.loads((PACKAGES[name] / "pyproject.toml").read_text())["project"]
        for requirement in project.get("dependencies", []):
            local = re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]
            if local in PACKAGES:
                visit(local)
        order.append(name)

    visit(dist)
    return order


def test_extra(dist: str) -> str:
    """``"[test]"`` when ``dist`` declares a ``test`` extra, else ``""``."""
    project = tomllib.loads((PACKAGES[dist] / "pyproject.toml").read_text())["project"]
    return "[test]" if "test" in project.get("optional-dependencies", {}) else ""


def install(session: nox.Session, *args: str) -> None:
    if os.environ.get("TORCH_INDEX_URL"):
        session.install(*CONSTRAINTS, "torch", "--index-url", os.environ["TORCH_INDEX_URL"])
    session.install(*CONSTRAINTS, *args)


@nox.session
def tests(session: nox.Session) -> None:
    """Every package's tests and the integration tests, in one environment, on all cores."""
    install(session, "-r", "requirements-dev.txt")
    session.run("pytest", "-n", "auto", *session.posargs)


def package_session(dist: str) -> None:
    @nox.session(name=dist)
    def run(session: nox.Session) -> None:
        # Non-editable: proves the built wheel is complete. pstate[testing] brings the rank harness.
        local = [str(PACKAGES[name]) for name in dependencies(dist)]
        local[-1] += test_extra(dist)  # the package's own test-only references (trainer: transformers)
        install(session, *local, f"{PACKAGES['pstate']}[testing]", *TEST_TOOLS)
        session.run("pytest", "-n", "auto", str(PACKAGES[dist] / "tests"), *session.posargs)

    run.__doc__ = f"{dist} alone: only its declared dependencies installed."


for _dist in PACKAGES:
    package_session(_dist)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff, and the import contracts of the package table (read from source, nothing installed)."""
    session.install(*CONSTRAINTS, "ruff", "import-linter")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    src = os.pathsep.join(str(p / "src") for p in PACKAGES.values())
    session.run("lint-imports", "--no-cache", env={"PYTHONPATH": src})


@nox.session
def integration(session: nox.Session) -> None:
    """Tests that cross packages."""
    editable = [f"-e{p}[testing]" if name == "pstate" else f"-e{p}" for name, p in PACKAGES.items()]
    install(session, *editable, *TEST_TOOLS, "import-linter", "megatron-core")
    session.run("pytest", "-n", "auto", "integration_tests", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the docs site with warnings as errors."""
    session.install(*CONSTRAINTS, "mkdocs")
    session.run("mkdocs", "build", "--strict", "-f", "docs/mkdocs.yml")

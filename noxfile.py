"""Sessions: ``tests`` (everything, one environment), one per package (that package, its declared
dependencies and its own extras only), ``oldest-python`` (pstate on the oldest Python the packages
declare), ``lint`` (ruff and the import contracts), ``integration``, ``docs`` and ``gpu`` (the GPU
validation run; a skip, exit 77, where no CUDA GPU is visible).

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
OLDEST_PYTHON = "3.10"

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
    """``[a,b]``: every extra ``dist`` declares (its tests use them: ``test`` references, ``plot``), else ``""``;
    not the ``gpu-*`` extras (CUDA-only packages, which the GPU validation run installs)."""
    project = tomllib.loads((PACKAGES[dist] / "pyproject.toml").read_text())["project"]
    names = sorted(n for n in project.get("optional-dependencies", {}) if not n.startswith("gpu-"))
    return f"[{','.join(names)}]" if names else ""


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
        local[-1] += test_extra(dist)  # its extras: test-only references (trainer: transformers), plots (pp-sched)
        install(session, *local, f"{PACKAGES['pstate']}[testing]", *TEST_TOOLS)
        session.run("pytest", "-n", "auto", str(PACKAGES[dist] / "tests"), *session.posargs)

    run.__doc__ = f"{dist} alone: only its declared dependencies installed."


for _dist in PACKAGES:
    package_session(_dist)


@nox.session(name="oldest-python", python=OLDEST_PYTHON)
def oldest_python(session: nox.Session) -> None:
    """pstate's tests on the oldest Python the packages declare. Only torch is held to its pin: the other
    pins (numpy's newest) may have dropped that Python."""
    torch_pin = next(line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("torch=="))
    if os.environ.get("TORCH_INDEX_URL"):
        session.install(torch_pin, "--index-url", os.environ["TORCH_INDEX_URL"])
    session.install(torch_pin, f"{PACKAGES['pstate']}[testing]", *TEST_TOOLS)
    session.run("pytest", "-n", "auto", str(PACKAGES["pstate"] / "tests"), *session.posargs)


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
    install(session, *editable, *TEST_TOOLS, "import-linter", "megatron-core", "mkdocs")
    session.run("pytest", "-n", "auto", "integration_tests", *session.posargs)


@nox.session(venv_params=["--system-site-packages"])
def gpu(session: nox.Session) -> None:
    """The GPU validation run (packages/trainer/benchmarks/gpu_validation.py): CUDA-marked tests, training in
    bf16/fp8 on both backends, generate, a checkpoint moved GPU -> CPU -> GPU, a throughput table. It sees
    the system's packages, so a container's Transformer Engine and DeepEP take part; exit 77 (no GPU) is a skip."""
    install(session, "-r", "requirements-dev.txt")
    script = str(ROOT / "packages" / "trainer" / "benchmarks" / "gpu_validation.py")
    session.run("python", script, *session.posargs, success_codes=[0, 77])


@nox.session
def docs(session: nox.Session) -> None:
    """Build the docs site with warnings as errors (its hook generates the CLI reference from trainer's parsers
    and fails on lists that render as text)."""
    install(session, *(f"-e{p}" for p in PACKAGES.values()), "mkdocs")
    session.run("mkdocs", "build", "--strict", "-f", "docs/mkdocs.yml")

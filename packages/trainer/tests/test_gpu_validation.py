"""The GPU validation script, where no CUDA GPU is visible: it exits at once with status 77 (skipped) and
a line saying why, so ``nox -s gpu`` on a CPU machine reports a skip, not a failure."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_validation.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible: the script would run")
def test_without_cuda_the_script_exits_at_once_saying_so(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 77, done.stderr
    assert done.stdout == "gpu_validation: no CUDA GPU is visible; nothing to validate here (exit 77)\n"
    assert not any(tmp_path.iterdir())  # nothing ran

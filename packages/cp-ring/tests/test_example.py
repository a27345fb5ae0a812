"""The README's example runs under torchrun, as a user would run it, and checks itself against one process."""

import pathlib
import subprocess
import sys

import pytest

EXAMPLE = pathlib.Path(__file__).parents[1] / "examples" / "cp_attention.py"


@pytest.mark.parametrize(("ranks", "options"), [(2, []), (4, ["--hierarchical"])], ids=["ring", "hierarchical"])
def test_the_example_runs_under_torchrun(ranks, options):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    command += [str(EXAMPLE), *options]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "outputs and gradients equal the unsharded block's" in done.stdout

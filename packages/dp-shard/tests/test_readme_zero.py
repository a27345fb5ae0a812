"""The README's distributed-optimizer example runs as a user would run it (two ranks): both ranks print
the same gradient norm, and their shards of ``0.weight``'s state are two ranges that cover it once."""

import ast
import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).parents[1] / "README.md"


def test_the_sharded_optimizer_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    code = next(block for block in blocks if "ShardedOptimizer(" in block)
    script = tmp_path / "example.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    (norm0, range0), (norm1, range1) = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert norm0 == norm1 > 0
    assert range0[0] == 0 and range0[1] == range1[0] and range1[1] == 16 * 32

"""``ckpt inspect PATH`` (and ``python -m ckpt``): what a checkpoint holds, and a non-zero exit when a
file is corrupt or missing."""

import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import ckpt
from pstate import ParallelConfig, Shard


def save_tp2(path):
    rank = dist.get_rank()
    state = {
        "layer": {"weight": Shard(torch.ones(3, 8, dtype=torch.bfloat16), (6, 8), (3 * rank, 0))},
        "norm": torch.ones(8),
        "rng": ckpt.PerRank(torch.zeros(4, dtype=torch.uint8)),
        "step": 12,
    }
    ckpt.save(state, path, layout=ParallelConfig(tp=2))


def run(*args):
    return subprocess.run([*args], capture_output=True, text=True)


def test_inspect_lists_tensors_layout_and_verifies(run_ranks, tmp_path):
    path = tmp_path / "step_00000012"
    run_ranks(2, save_tp2, str(path))
    script = Path(sys.executable).with_name("ckpt")
    out = run(str(script), "inspect", str(path))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "saved by 2 ranks" in text and '"tp": 2' in text
    assert "layer/weight  bfloat16  (6, 8)                  2           96" in text
    assert "norm          float32   (8,)                    1           32" in text
    assert "per-rank tensor rng: ranks [0, 1]" in text and "value step = 12" in text
    assert "files: 2," in text and "checksums and contents: ok" in text

    summary = json.loads(run(sys.executable, "-m", "ckpt", "inspect", "--json", str(path)).stdout)
    assert summary["problems"] == [] and summary["layout"]["tp"] == 2
    sizes = summary["files"]
    assert sizes == {p.name: p.stat().st_size for p in path.glob("*.safetensors")}

    victim = path / "rank_00001.safetensors"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    out = run(sys.executable, "-m", "ckpt", "inspect", str(path))
    assert out.returncode == 1
    assert "checksums and contents: FAILED" in out.stdout and "rank_00001.safetensors: checksum mismatch" in out.stdout
    assert run(sys.executable, "-m", "ckpt", "inspect", "--no-verify", str(path)).returncode == 0

    victim.unlink()
    out = run(sys.executable, "-m", "ckpt", "inspect", str(path))
    assert out.returncode == 1 and "rank_00001.safetensors: data file is missing" in out.stdout


def test_inspect_of_something_else_fails(tmp_path):
    out = run(sys.executable, "-m", "ckpt", "inspect", str(tmp_path))
    assert out.returncode == 2 and "index.json is missing" in out.stderr

"""The GPU validation run: everything the CPU suite cannot check, on one machine with CUDA GPUs.

    python packages/trainer/benchmarks/gpu_validation.py [--out DIR] [--steps 20] [--bench-steps 8]
    nox -s gpu

In order, each step a subprocess whose outcome goes into the summary:

1. the tests marked ``cuda`` / ``te`` of every package (world 1 on NCCL, world N where N GPUs are);
2. ``trainer train`` on the GPU for a tiny model in bf16 and fp8 on the torch backend, and on the
   Transformer Engine backend where it is installed (the loss must fall);
3. ``trainer generate`` from the bf16 checkpoint;
4. a checkpoint saved on the GPU, resumed on the CPU for a few steps, and resumed on the GPU again;
5. the ``flex`` dispatcher (DeepEP, where installed and 2+ GPUs are) against ``alltoall``: the same losses;
6. a throughput table (tokens/s, MFU over the datasheet peak, peak memory) of a ~1.1B Llama-shaped
   model for each precision and backend available.

Exit status: 0 when every step passed, 1 when one failed, 77 (the "skipped" convention of automake and
meson) at once, with a line saying so, on a machine without a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from importlib.util import find_spec
from pathlib import Path

NO_GPU = 77
ROOT = Path(__file__).resolve().parents[3]
TINY = ["--model", "tiny", "--seq-len", "64", "--micro-batch", "4", "--lr", "3e-3"]
#: TinyLlama-1.1B's shape: 22 layers of width 2048, 32 heads over 4 key/value heads, SwiGLU 5632.
LLAMA_1B = [f"model.{k}={v}" for k, v in dict(
    hidden=2048, layers=22, heads=32, kv_heads=4, ffn_hidden=5632, vocab_size=32000, max_seq_len=2048
).items()]  # fmt: skip


def trainer(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if '"loss"' in line]


class Report:
    """Steps and their outcomes, printed as they finish and summed up at the end."""

    def __init__(self) -> None:
        self.results: list[tuple[str, bool, str]] = []

    def check(self, name: str, done: subprocess.CompletedProcess, ok: bool = True, detail: str = "") -> bool:
        passed = done.returncode == 0 and ok
        if not passed:
            detail = detail or (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        self.results.append((name, passed, detail))
        print(f"[{'pass' if passed else 'FAIL'}] {name}{': ' + detail if detail else ''}", flush=True)
        return passed


def backends() -> list[tuple[str, str]]:
    """(backend, precision) pairs this machine can run."""
    pairs = [("torch", "bf16")] + ([("torch", "fp8")] if find_spec("torchao") else [])
    if find_spec("transformer_engine"):
        pairs += [("te", "bf16"), ("te", "fp8")]
    return pairs


def train_steps(report: Report, out: Path, steps: int, gpus: int) -> None:
    for backend, precision in backends():
        metrics, save = out / f"tiny-{backend}-{precision}.jsonl", out / f"ckpt-{backend}-{precision}"
        done = trainer(
            "train", *TINY, "--steps", str(steps), "--precision", precision, "--set", f"model.backend={backend}",
            "--nproc", str(gpus), "--save", str(save), "--metrics-file", str(metrics),
        )  # fmt: skip
        losses = [r["loss"] for r in records(metrics)] if metrics.exists() else []
        fell = len(losses) == steps and losses[-1] < losses[0] - 0.5
        report.check(
            f"train tiny {backend} {precision} on {gpus} GPU(s)", done, fell, f"loss {losses[:1]}..{losses[-1:]}"
        )


def generate_and_move(report: Report, out: Path, steps: int) -> None:
    save = out / "ckpt-torch-bf16"
    done = trainer("generate", "--load", str(save), "--prompt", "def main(", "--max-new-tokens", "16")
    report.check("generate from the GPU checkpoint", done, bool(done.stdout.strip()))
    moved, metrics = out / "ckpt-moved", out / "moved.jsonl"
    common = [*TINY, "--save", str(moved), "--metrics-file", str(metrics)]
    first = trainer("train", *common, "--steps", str(steps))
    report.check("save on the GPU", first)
    cpu = trainer("train", *common, "--steps", str(steps + 4), "--load", str(moved), env={"CUDA_VISIBLE_DEVICES": ""})
    report.check("resume on the CPU", cpu)
    back = trainer("train", *common, "--steps", str(steps + 8), "--load", str(moved))
    got = [r["step"] for r in records(metrics)] if metrics.exists() else []
    report.check("resume on the GPU again", back, got == list(range(1, steps + 9)), f"steps {got[:1]}..{got[-1:]}")


def flex_against_alltoall(report: Report, out: Path, gpus: int) -> None:
    if not find_spec("deep_ep") or gpus < 2:
        print("[skip] flex dispatcher: needs deep_ep and 2+ GPUs", flush=True)
        return
    losses = {}
    for dispatcher in ("alltoall", "flex"):
        metrics = out / f"moe-{dispatcher}.jsonl"
        done = trainer(
            "train", "--model", "tiny-moe", "--seq-len", "64", "--micro-batch", "2", "--steps", "6", "--ep", "2",
            "--nproc", "2", "--precision", "bf16", "--set", f"model.moe_dispatcher={dispatcher}",
            "--metrics-file", str(metrics),
        )  # fmt: skip
        report.check(f"train tiny-moe ep2 {dispatcher}", done)
        losses[dispatcher] = [r["loss"] for r in records(metrics)] if metrics.exists() else []
    a, f = losses["alltoall"], losses["flex"]
    close = len(a) == len(f) > 0 and all(abs(x - y) <= 2e-2 * abs(x) for x, y in zip(a, f))  # bf16 rounding
    report.results.append(("flex matches alltoall (bf16, rtol 2e-2)", close, f"{a} vs {f}"))
    print(f"[{'pass' if close else 'FAIL'}] flex matches alltoall: {a} vs {f}", flush=True)


def throughput(report: Report, out: Path, steps: int) -> list[str]:
    rows = [f"{'backend':<8}{'precision':<10}{'tokens/s':>12}{'MFU':>8}{'peak memory':>14}  peak source"]
    for backend, precision in backends():
        metrics = out / f"llama1b-{backend}-{precision}.jsonl"
        sets = [x for s in [*LLAMA_1B, f"model.backend={backend}"] for x in ("--set", s)]
        done = trainer(
            "train", "--seq-len", "2048", "--micro-batch", "2", "--steps", str(steps), "--precision", precision,
            *sets, "--metrics-file", str(metrics),
        )  # fmt: skip
        if not report.check(f"throughput llama-1.1b {backend} {precision}", done):
            continue
        steady = records(metrics)[2:] or records(metrics)  # the first steps warm up kernels and the allocator
        tps = sum(r["tokens_per_s"] for r in steady) / len(steady)
        mfu = sum(r["mfu"] for r in steady) / len(steady)
        memory = max(r["memory_mb"] for r in steady) / 1024
        rows.append(
            f"{backend:<8}{precision:<10}{tps:>12,.0f}{100 * mfu:>7.1f}%{memory:>10.1f} GiB  {steady[-1]['mfu_peak']}"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="where runs write (default: a temporary folder)")
    parser.add_argument("--steps", type=int, default=20, help="steps of the tiny training runs")
    parser.add_argument("--bench-steps", type=int, default=8, help="steps of each throughput run")
    parser.add_argument("--skip-tests", action="store_true", help="leave out the package tests (step 1)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(f"gpu_validation: no CUDA GPU is visible; nothing to validate here (exit {NO_GPU})", flush=True)
        return NO_GPU
    gpus = torch.cuda.device_count()
    print(f"gpu_validation: {gpus} x {torch.cuda.get_device_name(0)}; torch {torch.__version__}", flush=True)
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu-validation-"))
    out.mkdir(parents=True, exist_ok=True)
    report = Report()
    if not args.skip_tests:
        tests = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda or te", "packages"],
            cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
        report.check("package tests marked cuda/te", tests, detail=(tests.stdout.strip().splitlines() or [""])[-1])
    train_steps(report, out, args.steps, gpus)
    generate_and_move(report, out, args.steps)
    flex_against_alltoall(report, out, gpus)
    table = throughput(report, out, args.bench_steps)
    print("\n".join(["", "throughput, ~1.1B Llama shape, seq 2048, micro-batch 2, one GPU:", *table]), flush=True)
    failed = [name for name, passed, _ in report.results if not passed]
    print(f"\n{len(report.results) - len(failed)} passed, {len(failed)} failed" + (f": {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-rank setup, step and checkpoint-planning costs at worlds 8, 1,024 and 16,384, from dry runs.

Each (world, rank) runs in a fresh process (``--one``): a warm-up dry run at world 8 first (imports and
first-use costs), then three measured ones (the least of each phase), so every world pays the same
one-off costs. Reported per
phase: process CPU seconds (one thread; wall seconds on a shared machine mostly measure waiting for a
core) and resident-memory growth (MiB) of the config checks, the fake process group, this
rank's groups (``pstate.initialize`` creates only the groups that hold the rank under the fake
backend), the model and engine, one training step under simulated communication (``pstate.comm``:
its Python overhead, the tiny model's compute being small) and the locally derived checkpoint plan;
the ratio of each world's total to world 8's.

Layout: the tiny MoE model (real size) at TP2 x CP2 x PP2 x EP2 with SP and ZeRO-1, DP growing with
the world. Then the 70B-class layouts of issue 18 on the meta device (no step): Llama-3-70B at TP8 x CP2
x PP8 and Mixtral-8x22B at TP4 x CP2 x PP8 x EP8 (ETP1), ranks 0, the middle one and the last of
16,384.

    python packages/trainer/benchmarks/bench_dry_run.py            # the tables (a few minutes)
    python packages/trainer/benchmarks/bench_dry_run.py --quick    # worlds 8 and 1,024 only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

TINY = {
    "model": {"preset": "tiny-moe", "vocab_size": 256},
    "parallel": {"tp": 2, "cp": 2, "pp": 2, "ep": 2},
    "train": {"sequence_parallel": True, "seq_len": 32, "micro_batch": 1, "zero": 1},
}
LARGE = {
    "llama3-70b": {
        "model": {"preset": "llama3-70b"},
        "parallel": {"tp": 8, "cp": 2, "pp": 8},
        "train": {"sequence_parallel": True, "seq_len": 8192, "micro_batch": 1, "global_batch": 2048, "zero": 1,
                  "precision": "bf16"},
    },
    "mixtral-8x22b": {
        "model": {"preset": "mixtral-8x22b"},
        "parallel": {"tp": 4, "cp": 2, "pp": 8, "ep": 8, "etp": 1},
        "train": {"sequence_parallel": True, "seq_len": 8192, "micro_batch": 1, "global_batch": 2048, "zero": 1,
                  "precision": "bf16"},
    },
}  # fmt: skip
REPEATS = 3
PHASES = ("config", "process_group", "groups", "model_and_engine", "step", "checkpoint_plan")


def one(overrides: dict, world: int, rank: int, device: str) -> dict:
    """Run in a fresh process: a warm-up dry run at world 8, then the measured one."""
    import torch

    from trainer.config import load_run_config
    from trainer.train.dry_run import dry_run

    torch.set_num_threads(1)  # CPU seconds then measure this rank's work, not idle intra-op threads
    spent = [0.0, 0]  # CPU seconds inside torch.distributed.new_group, calls
    new_group = torch.distributed.new_group

    def timed_new_group(*args, **kwargs):
        began = time.process_time()
        try:
            return new_group(*args, **kwargs)
        finally:
            spent[0] += time.process_time() - began
            spent[1] += 1

    torch.distributed.new_group = timed_new_group
    cfg = load_run_config(overrides=overrides)
    if device != "meta":
        dry_run(load_run_config(overrides=TINY), 8, 0, device=device)
    spent[:] = [0.0, 0]
    runs = [dry_run(cfg, world, rank, device=device, step=device != "meta") for _ in range(REPEATS)]
    report = runs[0]
    report["new_group"] = {"cpu_seconds": spent[0] / REPEATS, "calls": spent[1] // REPEATS}
    for key in ("seconds", "cpu_seconds"):  # the least of the repeats, per phase
        report[key] = {ph: min(r[key][ph] for r in runs) for ph in report[key]}
    report.pop("comm", None)
    return report


def spawn(overrides: dict, world: int, rank: int, device: str) -> dict:
    args = [sys.executable, __file__, "--one", json.dumps([overrides, world, rank, device])]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="worlds 8 and 1,024 only, no 70B-class layouts")
    args = p.parse_args()
    if args.one:
        overrides, world, rank, device = json.loads(args.one)
        print(json.dumps(one(overrides, world, rank, device)))
        return
    worlds = (8, 1024) if args.quick else (8, 1024, 16384)
    print("tiny-moe TP2xCP2xPP2xEP2 SP ZeRO-1, real size, one simulated step; rank = world/2 + 1")
    head = " ".join(f"{ph:>16}" for ph in PHASES)
    print(f"CPU seconds per phase\n{'world':>6} {head} {'total s':>8} {'vs 8':>5}  new_group s (calls)  "
          "resident MiB (model+engine, step)")  # fmt: skip
    base = None
    for world in worlds:
        r = spawn(TINY, world, world // 2 + 1, "real")
        total = sum(r["cpu_seconds"].values())
        base = base or total
        cells = " ".join(f"{r['cpu_seconds'].get(ph, 0.0):>16.4f}" for ph in PHASES)
        mem = r["resident_mib"]
        grown = f"{mem['model_and_engine']:.1f}, {mem['step']:.1f}"
        made = f"{r['new_group']['cpu_seconds']:.4f} ({r['new_group']['calls']})"
        print(f"{world:>6} {cells} {total:>8.3f} {total / base:>5.2f}  {made:>19}  {grown}")
    if args.quick:
        return
    print("\n70B-class layouts at world 16,384, meta device (no step): CPU seconds per phase; GiB per rank")
    for name, overrides in LARGE.items():
        for rank in (0, 8191, 16383):
            r = spawn(overrides, 16384, rank, "meta")
            s, b = r["cpu_seconds"], r["bytes"]
            gib = {k: round(v / 2**30, 2) for k, v in b.items()}
            print(f"{name:>14} rank {rank:>5}: groups {s['groups']:.3f} s, model+engine {s['model_and_engine']:.2f} s, "
                  f"checkpoint plan {s['checkpoint_plan']:.2f} s, resident +{sum(r['resident_mib'].values()):.0f} "
                  f"MiB; {gib}; checkpoint {r['checkpoint']['pieces']} pieces")  # fmt: skip


if __name__ == "__main__":
    main()

"""The planner's memory and traffic models against real runs of the trainer on this machine (CPU, gloo).

    python packages/trainer/benchmarks/calibrate_plan.py [--only NAME ...]

Each layout runs the trainer's own ``setup`` and two ``train_step`` calls (fp32; a Llama-style model of
hidden 256, 4 layers, 8/4 heads, vocab 4096; 4 micro-batches of 2 sequences of 256 tokens per rank) on
its ranks (``pstate.testing.Harness``). Measured on rank 0 (pipeline stage 0, the one the planner calls
fullest):

- **peak**: the most bytes the CPU allocator held at once from before the model was built to the end of
  the second step (PyTorch's profiler with ``profile_memory``: its running "Total Allocated");
- **states**: the parameters, their gradients and the optimizer's state after the second step (the
  data-parallel engine's ``memory_bytes``);
- **traffic**: the bytes rank 0 sends in the second step, by axis, from every collective and p2p call
  (the functions are wrapped in the rank; ring volumes: all-reduce ``2(n-1)/n``, all-gather,
  reduce-scatter and all-to-all ``(n-1)/n`` of the whole tensor, sends their size). Scalars (the loss,
  the norm) are left out: they are not modelled.

Predicted: ``trainer.plan.estimate`` for the same workload and layout (``memory.total`` and the
parameters + gradients + optimizer parts; ``StepTime.traffic``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist

import pstate
from pstate.testing import Harness
from trainer.config import RunConfig, check_run
from trainer.model import preset
from trainer.plan import Layout, Workload, estimate, load_hardware
from trainer.train import train_step
from trainer.train.setup import setup

MODEL = preset("tiny").with_overrides(
    hidden=256, layers=4, heads=8, kv_heads=4, ffn_hidden=None, vocab_size=4096, max_seq_len=256
)
SEQ, MB, MICRO = 256, 2, 4
LAYOUTS = {
    "dp4 ddp": dict(world=4),
    "dp4 zero1": dict(world=4, zero=1),
    "dp4 zero2": dict(world=4, zero=2),
    "dp4 zero3": dict(world=4, zero=3),
    "dp4 ddp full recompute": dict(world=4, recompute="full"),
    "dp4 ddp selective": dict(world=4, recompute="selective"),
    "tp2 sp dp2": dict(world=4, tp=2, sequence_parallel=True),
    "tp2 dp2 no sp": dict(world=4, tp=2),
    "pp2 dp2 1f1b": dict(world=4, pp=2),
    "tp2 pp2 sp": dict(world=4, tp=2, pp=2, sequence_parallel=True),
    "cp2 dp2": dict(world=4, cp=2),
}


def _workload(layout: Layout) -> Workload:
    return Workload(MODEL, SEQ, MB * MICRO * layout.dp, "fp32", backend="gloo", fused_norm=False)


class Traffic:
    """Wraps the collectives and sends of ``torch.distributed`` (and every module's imported copies)."""

    NAMES = ("all_reduce", "all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor",
             "reduce_scatter_single", "all_to_all_single", "all_gather", "isend", "send", "batch_isend_irecv",
             "broadcast")  # fmt: skip

    def __init__(self) -> None:
        self.calls: list[tuple[str, object, float]] = []
        self.on = False
        originals = {n: getattr(dist, n) for n in self.NAMES if hasattr(dist, n)}
        wrapped = {id(f): self._wrap(n, f) for n, f in originals.items()}
        for module in list(sys.modules.values()):
            for name, value in list(getattr(module, "__dict__", {}).items()):
                if callable(value) and id(value) in wrapped:
                    setattr(module, name, wrapped[id(value)])

    def _wrap(self, name: str, f):
        def call(*args, **kwargs):
            if self.on:
                self._record(name, args, kwargs)
            return f(*args, **kwargs)

        call.__wrapped__ = f
        return call

    def _record(self, name: str, args: tuple, kwargs: dict) -> None:
        group = kwargs.get("group")
        if name == "batch_isend_irecv":
            for op in args[0]:
                if op.op.__name__.endswith("isend") and op.tensor.numel() > 4:
                    self.calls.append(("send", op.group, op.tensor.nbytes))
            return
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if name == "all_gather":
            tensors = [args[1]]
        group = group if group is not None else (args[2] if name in ("isend", "send") and len(args) > 2 else None)
        n = dist.get_world_size(group)
        if not tensors or max(t.numel() for t in tensors) <= 4 or n == 1:
            return
        if name == "all_reduce":
            volume = 2 * (n - 1) / n * tensors[0].nbytes
        elif name in ("all_gather_into_tensor", "all_gather_single"):
            volume = (n - 1) / n * tensors[0].nbytes
        elif name in ("reduce_scatter_tensor", "reduce_scatter_single", "all_to_all_single"):
            volume = (n - 1) / n * tensors[1].nbytes
        elif name == "all_gather":
            volume = (n - 1) * tensors[0].nbytes
        elif name == "broadcast":  # one per owner's shard: on average (n-1)/n of it leaves each rank
            volume = (n - 1) / n * tensors[0].nbytes
        else:
            volume = tensors[0].nbytes
        self.calls.append((name, group, volume))


def measure(layout: Layout) -> dict:
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    cfg: RunConfig = layout.run_config(_workload(layout))
    traffic = Traffic()
    memory = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with memory as prof, pstate.initialize(cfg.parallel) as ps:
        run = setup(cfg, ps, MODEL, check_run(cfg, dist.get_world_size()))
        rng = np.random.default_rng(ps.dp.rank)
        batches = [[rng.integers(0, MODEL.vocab_size, (MB, SEQ + 1)) for _ in range(MICRO)] for _ in range(2)]
        train_step(run, batches[0])
        dist.barrier()
        traffic.on = True
        train_step(run, batches[1])
        traffic.on = False
        held = run.engine.memory_bytes()
        states = held["params"] + held["grads"] + held["optimizer"]
        axes = {"tp": ps.tp, "cp": ps.cp, "pp": ps.pp, "dp": ps.dp_cp, "ep": ps.ep}
        by_axis: dict[str, float] = {}
        for _, group, volume in traffic.calls:
            axis = next((a for a, x in axes.items() if x.size > 1 and x.group is group), "other")
            if axis == "other" and ps.edp.size > 1 and group is ps.edp.group:
                axis = "dp"
            if axis == "other" and group is ps.dp.group:
                axis = "dp"
            by_axis[axis] = by_axis.get(axis, 0.0) + volume
        rank = dist.get_rank()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        with open(f.name) as trace:
            events = sorted((e for e in json.load(trace)["traceEvents"] if e.get("name") == "[memory]"),
                            key=lambda e: e["ts"])  # fmt: skip
    # the running total carries over from earlier sessions in this (warm) process: start from its value
    base = events[0]["args"]["Total Allocated"] - events[0]["args"]["Bytes"] if events else 0
    peak = max((e["args"]["Total Allocated"] for e in events), default=0) - base
    return {"rank": rank, "peak": peak, "states": states, "traffic": by_axis}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="layout names (default: all)")
    args = parser.parse_args()
    hw = load_hardware("h100-sxm")
    mib = 2**20
    print(f"model: hidden {MODEL.hidden}, {MODEL.layers} layers, heads {MODEL.heads}/{MODEL.num_kv_heads}, ffn "
          f"{MODEL.ffn}, vocab {MODEL.vocab_size}; seq {SEQ}, micro-batch {MB} x {MICRO}, fp32, rank 0")  # fmt: skip
    print("| layout | peak MiB measured | predicted | error | states MiB measured | predicted | traffic MiB/step "
          "measured (by axis) | predicted | error |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    with Harness(timeout_s=900, threads=1) as harness:
        for name, fields in LAYOUTS.items():
            if args.only and name not in args.only:
                continue
            layout = Layout(**fields, micro_batch=MB)
            got = harness.run(layout.world, measure, layout)[0]
            e = estimate(_workload(layout), layout, hw)
            states = sum(e.memory.parts[k] for k in ("parameters", "gradients", "optimizer", "master weights"))
            sent = {k: v for k, v in got["traffic"].items() if v}
            predicted = {k: v for k, v in e.time.traffic.items() if v}
            measured_total, predicted_total = sum(sent.values()), sum(predicted.values())
            err = (predicted_total / measured_total - 1) if measured_total else 0.0
            peak_err = 100 * (e.memory.total / got["peak"] - 1)
            print(f"| {name} | {got['peak'] / mib:.1f} | {e.memory.total / mib:.1f} | {peak_err:+.0f}% | "
                  f"{got['states'] / mib:.1f} | {states / mib:.1f} | "
                  f"{measured_total / mib:.2f} ({', '.join(f'{k} {v / mib:.2f}' for k, v in sent.items())}) | "
                  f"{predicted_total / mib:.2f} ({', '.join(f'{k} {v / mib:.2f}' for k, v in predicted.items())}) "
                  f"| {100 * err:+.0f}% |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

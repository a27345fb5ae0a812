"""ZeRO-3 and HSDP against torch's FSDP2 at world 8: step time, and bytes per step over the analytic minimum.

    python packages/dp-shard/benchmarks/bench_hsdp.py [--world 8 --shard 4 --layers 4 --hidden 256 --micro 2]

Both modes go through ``dp_shard.make_engine(3, ...)``: ZeRO-3 shards every layer over all ``--world``
ranks; HSDP over a shard group of ``--shard`` adjacent ranks (``pstate``'s ``dp_shard`` axis, from
``ParallelConfig(dp_shard=...)``), replicated across the ``world / shard`` groups (``dp_replicate``). The
torch side is FSDP2's ``fully_shard`` per layer on a 1-D ``DeviceMesh`` (ZeRO-3) and on a 2-D one
``(replicate, shard)`` (HSDP), with ``set_requires_gradient_sync(False)`` for all but the last
micro-batch. The same MLP (``--layers`` x ``Linear(hidden, hidden)`` + ReLU, fp32, AdamW), the same
batches, gloo, one thread per rank; ``--bf16`` gathers in bf16 on both sides (ours: ``param_dtype``;
FSDP2: ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``).

Bytes: what ``pstate.comm`` records in one step, as ring wire bytes (nccl-tests' factors), over the minimum
for ``m`` micro-batches, ``P`` parameters of ``b`` bytes gathered, shard size ``s`` and ``r`` replicas:
an all-gather for each micro-batch's forward and backward, ``2m (s-1)/s P b``; one reduce-scatter of the
fp32 gradient within the shard group, ``(s-1)/s 4P``; and (HSDP) one all-reduce of its ``1/s`` across the
replicas, ``2(r-1)/r 4P/s``. Step time: the slowest rank's, the median of alternating rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch
import torch.distributed as dist
from bench_common import alternate_rounds, inputs
from torch import nn

import pstate
from dp_shard import ClipGroups, make_engine
from pstate.comm import CommRecorder
from pstate.testing import Harness

LR = 1e-3


def mlp(layers: int, hidden: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU()) for _ in range(layers)])


def ours(ps: pstate.ParallelState, hsdp: bool, layers: int, hidden: int, bf16: bool):
    return make_engine(
        3,
        [mlp(layers, hidden)],
        group=ps.dp_shard if hsdp else ps.dp_cp,
        replicate_group=ps.dp_replicate if hsdp else None,
        param_groups=lambda named: [{"params": list(named.items())}],
        optimizer_cls=torch.optim.AdamW,
        units=lambda chunk: list(chunk),
        param_dtype=torch.bfloat16 if bf16 else None,
        lr=LR,
    )


def engine_step(engine, xs: list[torch.Tensor]) -> None:
    engine.zero_grad()
    for i, x in enumerate(xs):
        with engine.no_sync(0) if i < len(xs) - 1 else contextlib.nullcontext():
            engine.modules[0](x).float().square().mean().backward()
    engine.finish_grad_sync()
    engine.step(float("inf"), ClipGroups())


def fsdp2(hsdp: bool, shard: int, layers: int, hidden: int, bf16: bool):
    """The step function of FSDP2 on a 1-D mesh (ZeRO-3) or a 2-D ``(replicate, shard)`` mesh (HSDP)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    n = dist.get_world_size()
    mesh = init_device_mesh("cpu", (n // shard, shard), mesh_dim_names=("replicate", "shard")) if hsdp else None
    mesh = mesh or init_device_mesh("cpu", (n,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    options = {"mesh": mesh} | ({"mp_policy": policy} if policy else {})
    model = mlp(layers, hidden)
    for block in model:
        fully_shard(block, **options)
    fully_shard(model, **options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)

    def step(xs):
        for i, x in enumerate(xs):
            model.set_requires_gradient_sync(i == len(xs) - 1)
            model(x).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def minimum(n: int, shard: int, numel: int, micro: int, itemsize: int) -> float:
    s, r = shard, n // shard
    gathers = 2 * micro * (s - 1) / s * numel * itemsize
    reduce = (s - 1) / s * 4 * numel + (2 * (r - 1) / r * 4 * numel / s if r > 1 else 0.0)
    return gathers + reduce


def measure(shard: int, layers: int, hidden: int, batch: int, micro: int, iters: int, rounds: int, bf16: bool):
    torch.set_num_threads(1)
    n = dist.get_world_size()
    ps = pstate.initialize(pstate.ParallelConfig(dp_shard=shard))
    xs = [inputs(hidden, batch) + i for i in range(micro)]
    numel = layers * (hidden + 1) * hidden
    out = {}
    for mode, size in (("zero3", n), ("hsdp", shard)):
        hsdp = mode == "hsdp"
        engine = ours(ps, hsdp, layers, hidden, bf16)
        engine_step(engine, xs)
        recorder = CommRecorder.for_state(ps)
        with recorder:
            engine_step(engine, xs)
        records = [r for r in recorder.records if r.op != "all_reduce" or r.axis == "dp_replicate"]  # not the norm
        wire = sum(r.wire_bytes for r in records)
        axes: dict[str, int] = {}
        for r in records:
            axes[r.axis] = axes.get(r.axis, 0) + round(r.wire_bytes)
        native = fsdp2(hsdp, shard, layers, hidden, bf16)
        times = alternate_rounds(
            {"ours": lambda e=engine: engine_step(e, xs), "torch": lambda f=native: f(xs)}, iters, rounds
        )
        itemsize = 2 if bf16 else 4
        out[mode] = (wire / minimum(n, size, numel, micro, itemsize), times["ours"], times["torch"], axes)
    ps.destroy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--shard", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    numel = args.layers * (args.hidden + 1) * args.hidden
    print(f"torch {torch.__version__}, cores: {os.cpu_count()}, world {args.world} over gloo, one thread per rank")
    print(
        f"{args.layers} x Linear({args.hidden}) (P = {numel:,}), {args.micro} micro-batches of {args.batch} per rank, "
        f"HSDP {args.shard} x {args.world // args.shard}, gathers in {'bf16' if args.bf16 else 'fp32'}"
    )
    shape = (args.shard, args.layers, args.hidden, args.batch, args.micro, args.iters, args.rounds, args.bf16)
    with Harness(timeout_s=1800) as harness:
        results = harness.run(args.world, measure, *shape)[0]
    print(f"{'mode':<6} {'bytes/min':>9} {'ours ms':>9} {'FSDP2 ms':>9} {'ratio':>6}  wire bytes per axis (rank 0)")
    for mode, (ratio, ours_s, torch_s, axes) in results.items():
        print(f"{mode:<6} {ratio:>9.3f} {ours_s * 1e3:>9.1f} {torch_s * 1e3:>9.1f} {ours_s / torch_s:>6.2f}  {axes}")


if __name__ == "__main__":
    main()

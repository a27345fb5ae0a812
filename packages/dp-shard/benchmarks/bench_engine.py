"""Every data-parallel mode through ``dp_shard.make_engine`` in one run: bytes per step on the DP axis
against the analytic minimum, step time against the PyTorch-native equivalent, and bytes per parameter
(tensors held, and resident memory) against the table of ``dp_shard.bytes_per_param``.

    python packages/dp-shard/benchmarks/bench_engine.py [--world 8 --layers 4 --hidden 256 --micro 2]

Modes ending in ``-bf16`` hold bf16 weights with fp32 main gradients and fp32 masters (Megatron's mixed
precision): their minimum is the fp32 gradient reduction plus, for ZeRO, an all-gather of the bf16
weights (``(n-1)/n * (4P + 2P)``); their torch counterparts run the same bf16 model (torch has no fp32
masters there, so it does less work). Resident: the growth of this rank's resident set from before the
engine is built to after two steps, per parameter (the allocator's slack included). The gradient norm's
scalar all-reduce is left out of the bytes.

Each mode trains the same MLP (``--layers`` x ``Linear(hidden, hidden)`` + ReLU, fp32, AdamW) for steps of
``--micro`` micro-batches (all but the last inside ``engine.no_sync``) on ``--world`` ranks over gloo, one
thread per rank. Bytes: what ``pstate.comm`` records on the DP axis in one step, as ring wire bytes (nccl-
tests' factors), divided by the minimum for the mode: DDP one all-reduce of the 4P gradient bytes (``2(n-1)/n
* 4P``), ZeRO-1/2 a reduce-scatter of 4P and an all-gather of 4P (the same), ZeRO-3 a reduce-scatter of 4P and
an all-gather of 4P for each micro-batch's forward and for its backward: ``(1 + 2m)(n-1)/n * 4P``. ZeRO-1/2
are measured with both collective choices: ``reduce_scatter`` (the minimum) and ``auto`` (over gloo: all-
reduce and broadcasts, faster there but more bytes: the same collectives ``ZeroRedundancyOptimizer`` over
DDP uses, so ``-auto`` is the like-for-like step time). Step time: the slowest rank's, the median of
alternating rounds, against ``DistributedDataParallel`` (with ``no_sync``), ``ZeroRedundancyOptimizer``
over DDP, and FSDP2 ``fully_shard`` per layer (``set_requires_gradient_sync(False)`` for all but the last
micro-batch). Both sides do what a training step does: the engine as the trainer builds it
(``average=False``: the loss carries ``1/dp``, the reductions sum) and ``engine.step``, whose global
gradient norm and clipping at ``MAX_NORM`` (1.0) the torch side does too (``clip_grad_norm_`` over its
gradients: whole on every rank under DDP and ``ZeroRedundancyOptimizer``, DTensor shards under FSDP2).
Bucket sizes are both libraries' defaults: 25 MiB (torch DDP's first bucket is 1 MiB). ``cpu``: the
same ratio for the CPU time of a rank's process per step (its threads included, waiting not), which an
oversubscribed machine (8 ranks on 2 cores, shared) disturbs far less than the wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch
import torch.distributed as dist
from bench_common import alternate_rounds, inputs
from torch import nn

from dp_shard import ClipGroups, bytes_per_param, make_engine
from pstate.comm import CommRecorder
from pstate.testing import Harness

LR = 1e-3
MAX_NORM = 1.0


def mlp(layers: int, hidden: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU()) for _ in range(layers)])


def groups(named):
    return [{"params": list(named.items())}]


ZERO = {"ddp": 0, "zero1": 1, "zero1-auto": 1, "zero2": 2, "zero2-auto": 2, "zero3": 3}


def split(mode: str) -> tuple[str, torch.dtype]:
    """The mode without its precision suffix, and the weights' dtype."""
    return mode.removesuffix("-bf16"), torch.bfloat16 if mode.endswith("-bf16") else torch.float32


def ours(mode: str, layers: int, hidden: int):
    base, dtype = split(mode)
    zero = ZERO[base]
    extra = {"collectives": "reduce_scatter"} if base in ("zero1", "zero2") else {}  # -auto: "auto"
    engine = make_engine(
        zero,
        [mlp(layers, hidden).to(dtype)],
        group=dist.group.WORLD,
        param_groups=groups,
        optimizer_cls=torch.optim.AdamW,
        units=lambda chunk: list(chunk),
        average=False,  # as the trainer: the loss carries 1/dp (engine.loss_factor)
        lr=LR,
        **extra,
    )
    return engine


def engine_step(engine, xs: list[torch.Tensor]) -> None:
    engine.zero_grad()
    for i, x in enumerate(xs):
        with engine.no_sync(0) if i < len(xs) - 1 else contextlib.nullcontext():
            (engine.modules[0](x).square().mean() * engine.loss_factor).backward()
    engine.finish_grad_sync()
    engine.step(MAX_NORM, ClipGroups())


def torch_native(mode: str, layers: int, hidden: int, dtype: torch.dtype = torch.float32):
    """(step function) of the PyTorch-native equivalent of ``mode``."""
    from torch.nn.parallel import DistributedDataParallel

    model = mlp(layers, hidden).to(dtype)
    if mode == "zero3":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in model:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR)

        def step(xs):
            for i, x in enumerate(xs):
                model.set_requires_gradient_sync(i == len(xs) - 1)
                model(x).square().mean().backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
            optimizer.step()
            optimizer.zero_grad()

        return step
    ddp = DistributedDataParallel(model)
    if mode == "ddp":
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    else:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=LR)

    def step(xs):
        for i, x in enumerate(xs):
            with ddp.no_sync() if i < len(xs) - 1 else contextlib.nullcontext():
                ddp(x).square().mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        optimizer.step()
        optimizer.zero_grad()

    return step


TORCH = {"ddp": "ddp", "zero1": "zero", "zero1-auto": "zero", "zero2": "zero", "zero2-auto": "zero", "zero3": "zero3"}


def resident_bytes() -> int:
    """This process's resident set now (not its peak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def minimum_bytes(mode: str, numel: int, n: int, micro: int) -> float:
    """The analytic minimum of the bytes a rank moves per step (ring factors; see the module notes)."""
    base, dtype = split(mode)
    if base == "zero3":  # no gather after the step: the next forward's
        return (1 + 2 * micro) * (n - 1) / n * 4 * numel
    if base == "ddp":
        return 2 * (n - 1) / n * 4 * numel
    return (n - 1) / n * (4 + dtype.itemsize) * numel  # fp32 reduce-scatter + all-gather of the weights


def measure(modes: list[str], layers: int, hidden: int, batch: int, micro: int, iters: int, rounds: int):
    import gc

    torch.set_num_threads(1)
    n = dist.get_world_size()
    numel = layers * (hidden + 1) * hidden
    out = {}
    for mode in modes:
        base, dtype = split(mode)
        xs = [(inputs(hidden, batch) + i).to(dtype) for i in range(micro)]
        warm = ours(mode, 1, 8)  # the first steps' one-off allocations (gloo, autograd, thread pools) first
        for _ in range(2):
            engine_step(warm, [x[:, :8] for x in xs])
        del warm
        gc.collect()
        before = resident_bytes()
        engine = ours(mode, layers, hidden)
        engine_step(engine, xs)
        engine_step(engine, xs)
        resident = (resident_bytes() - before) / numel
        recorder = CommRecorder({dist.group.WORLD: "dp"})
        with recorder:
            engine_step(engine, xs)
        wire = sum(r.wire_bytes for r in recorder.records if r.axis == "dp" and r.size > 1 and r.bytes > 8)
        native = torch_native(TORCH[base], layers, hidden, dtype)
        cpu: dict[str, float] = {}
        times = alternate_rounds(
            {"ours": lambda e=engine, b=xs: engine_step(e, b), "torch": lambda f=native, b=xs: f(b)}, iters, rounds, cpu
        )
        sixteen = dtype.itemsize == 2 and base != "zero3"
        master = torch.float32 if sixteen else None
        table = bytes_per_param(ZERO[base], n, weight_dtype=dtype, master_dtype=master)["total"]
        minimum = minimum_bytes(mode, numel, n, micro)
        cpu_ratio = cpu["ours"] / cpu["torch"]
        held = engine.bytes_per_param()
        out[mode] = (wire / minimum, times["ours"], times["torch"], cpu_ratio, held, table, resident)
        del engine, native
        gc.collect()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    modes = ["ddp", "zero1", "zero1-auto", "zero2", "zero2-auto", "zero3", "ddp-bf16", "zero1-bf16", "zero2-bf16"]
    parser.add_argument("--modes", nargs="+", default=modes)
    args = parser.parse_args()
    numel = args.layers * (args.hidden + 1) * args.hidden
    print(f"torch {torch.__version__}, cores: {os.cpu_count()}, world {args.world} over gloo, one thread per rank")
    print(f"{args.layers} x Linear({args.hidden}) (P = {numel:,}), {args.micro} micro-batches of {args.batch} per rank")
    shape = (args.modes, args.layers, args.hidden, args.batch, args.micro, args.iters, args.rounds)
    load = os.getloadavg()[0]
    results = {}
    for mode in args.modes:  # fresh processes per mode: the resident set then grows by this mode's tensors only
        with Harness(timeout_s=1800) as harness:
            results.update(harness.run(args.world, measure, [mode], *shape[1:])[0])
    native = {"ddp": "torch DDP", "zero": "ZeroRedundancyOpt", "zero3": "FSDP2"}
    print(
        f"{'mode':<11} {'bytes/min':>9} {'ours ms':>8} {'torch ms':>8} {'ratio':>6} {'cpu':>5}  {'vs':<17} "
        f"{'bytes/param held':<24} {'table':>6} {'resident':>8}"
    )
    for mode, (ratio, ours_s, torch_s, cpu_ratio, per, table, resident) in results.items():
        held = f"{per['params']:.2f}+{per['grads']:.2f}+{per['optimizer']:.2f}={per['total']:.2f}"
        print(
            f"{mode:<11} {ratio:>9.3f} {ours_s * 1e3:>8.1f} {torch_s * 1e3:>8.1f} {ours_s / torch_s:>6.2f} "
            f"{cpu_ratio:>5.2f}  {native[TORCH[split(mode)[0]]]:<17} {held:<24} {table:>6.2f} {resident:>8.2f}"
        )
    print(f"load average (1 min) before: {load:.1f}, after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

"""At 8 ranks, TP2 x PP2 x DP2: tokens/s of our stack against the same layout built from PyTorch-native parts.

    python packages/trainer/benchmarks/bench_layout.py [--hidden 256 --layers 4 --seq 128 --micro-batch 2
        --microbatches 4 --sequence-parallel --iters 2 --rounds 3]

8 gloo ranks on the CPU, one thread each (``pstate.testing.Harness``). The model is ``preset("tiny")``
(Llama-style: RMSNorm, rotary, GQA, SwiGLU, untied) scaled by the flags, fp32.

Ours: the trainer's own ``setup(cfg, ps, model, plan)`` (GPT chunks from ``tp_layers``,
``dp_shard.DataParallel``, AdamW, ``pp_sched``'s 1F1B executor) stepped by the loop's ``train_step``:
forwards and backwards over the micro-batches, the data-parallel reduction, the model-parallel gradient
completion, clipping by the global norm, the AdamW step, the global loss.

Native: the same decoder in plain modules (``Stage`` below; fused ``qkv`` and ``[gate; up]`` weights,
whose even row split over TP gives each rank its heads, as ours) with
``torch.distributed.tensor.parallel.parallelize_module`` on the ``tp`` dimension of a 3-D
``DeviceMesh`` ("pp", "dp", "tp"): ColwiseParallel / RowwiseParallel, a vocabulary-parallel embedding
and head with ``loss_parallel`` (and with ``--sequence-parallel``, SequenceParallel norms and
PrepareModuleInput), then ``DistributedDataParallel(device_mesh=mesh["dp"])``, then
``torch.distributed.pipelining``'s ``PipelineStage`` + ``Schedule1F1B`` over ``pp`` (the layers split as
ours), AdamW with the trainer's parameter groups and the same clipping (the global norm by hand: sharded
squares summed over tp, then over pp; torch's ``clip_grad_norm_`` knows neither split once DDP holds the
parameters as local tensors).

All of it builds and runs on torch 2.13 with gloo, with one numerical trap worked around: DDP given a dp
mesh sliced from a larger mesh applies torch's private TP + DDP transform (``_pre_dp_module_transform``),
which swaps the DTensor parameters for local tensors and, in the first forward, replaces them with
non-parameter DTensor attributes: from then on ``module.parameters()`` is empty, so ``Schedule1F1B``'s
default ``scale_grads=True`` (which divides ``submod.parameters()``'s gradients by the number of
micro-batches) silently does nothing and the gradients come out ``microbatches`` times too large. Here
``scale_grads=False`` and the loss function divides by the number of micro-batches instead; the optimizer
takes the parameters before the first forward. (Without DDP, the gradient of the RowwiseParallel
embedding comes back as a Replicate DTensor of the whole table, not the Shard(0) of the parameter.)

Before timing, both sides start from the same weights (our TP shards copied into the native DTensor
shards) and take two steps on the same batches: the global loss and gradient norm of each step must agree
within ``--rtol`` (the second step also checks the AdamW update). Each timed step is a full optimizer
step; a measurement is the slowest rank's time for ``--iters`` steps after one warm-up step; the sides
alternate for ``--rounds`` rounds and the medians are reported. ratio = ours / native tokens/s (above 1:
ours is faster). With 8 ranks on few cores the ranks also wait for a core, which weighs on the side with
more synchronisation points.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)
from torch.nn.parallel import DistributedDataParallel

import pstate
from pstate.testing import Harness
from trainer.config import OptimConfig, RunConfig, TrainConfig, check_run
from trainer.model import preset
from trainer.model.rotary import apply_rotary, inverse_frequencies, rotary_angles
from trainer.train import train_step
from trainer.train.setup import param_groups, setup

TP, PP, DP = 2, 2, 2


class Attention(nn.Module):
    """Fused ``qkv`` (this TP rank's query, key and value heads, as ColwiseParallel's row split of the
    TP-interleaved weight gives them), SDPA with GQA, and the output projection."""

    def __init__(self, cfg, tp: int) -> None:
        super().__init__()
        d = cfg.head_dim
        self.cfg, self.heads, self.kv_heads = cfg, cfg.heads // tp, cfg.num_kv_heads // tp
        self.qkv = nn.Linear(cfg.hidden, (cfg.heads + 2 * cfg.num_kv_heads) * d, bias=False)
        self.proj = nn.Linear(cfg.heads * d, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [batch, seq, hidden]
        b, s, d = x.size(0), x.size(1), self.cfg.head_dim
        q, k, v = self.qkv(x).split([self.heads * d, self.kv_heads * d, self.kv_heads * d], -1)
        q, k, v = (t.view(b, s, -1, d).transpose(1, 2) for t in (q, k, v))
        cos, sin = rotary_angles(torch.arange(s), inverse_frequencies(self.cfg))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        return self.proj(a.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    """SwiGLU with a fused ``[gate; up]`` ``fc1`` (TP-interleaved, as ``Attention.qkv``)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden, 2 * cfg.ffn, bias=False)
        self.fc2 = nn.Linear(cfg.ffn, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc1(x).chunk(2, -1)
        return self.fc2(F.silu(gate) * up)


class Layer(nn.Module):
    def __init__(self, cfg, tp: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps), nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.attn, self.mlp = Attention(cfg, tp), MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Stage(nn.Module):
    """One pipeline stage of the plain decoder: token ids ``[batch, seq]`` or hidden states ``[batch,
    seq(/tp), hidden]`` in; hidden states, or the logits on the last stage, out."""

    def __init__(self, cfg, tp: int, layers: int, *, first: bool, last: bool) -> None:
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.hidden) if first else None
        self.layers = nn.ModuleList(Layer(cfg, tp) for _ in range(layers))
        self.final_norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps) if last else None
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False) if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embedding is not None:
            x = self.embedding(x)
        for layer in self.layers:
            x = layer(x)
        if self.head is not None:
            x = self.head(self.final_norm(x))
        return x


def tp_plan(stage: Stage, sp: bool) -> dict:
    """``parallelize_module``'s plan: Megatron's split (column then row parallel in attention and MLP,
    vocabulary-parallel embedding and head with the loss computed on vocabulary shards); with ``sp``
    the norms and residual stream are sharded along the sequence (dimension 1)."""
    seq = Shard(1) if sp else Replicate()
    plan: dict = {}
    if stage.embedding is not None:
        plan["embedding"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    for i in range(len(stage.layers)):
        plan |= {
            f"layers.{i}.attn.qkv": ColwiseParallel(),
            f"layers.{i}.attn.proj": RowwiseParallel(output_layouts=seq),
            f"layers.{i}.mlp.fc1": ColwiseParallel(),
            f"layers.{i}.mlp.fc2": RowwiseParallel(output_layouts=seq),
        }
        if sp:
            plan |= {
                f"layers.{i}.norm1": SequenceParallel(),
                f"layers.{i}.norm2": SequenceParallel(),
                f"layers.{i}.attn": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
                f"layers.{i}.mlp": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
            }
    if stage.head is not None:
        if sp:
            plan["final_norm"] = SequenceParallel()
        plan["head"] = ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1), use_local_output=False)
    return plan


def copy_local_weights(native: Stage, chunk) -> None:
    """Our chunk's TP shards into the native stage's DTensor shards, after ``parallelize_module``: the
    same rows and columns, as both split the TP-interleaved fused weights evenly over TP."""
    ours = dict(chunk.named_parameters())
    with torch.no_grad():
        for name, param in native.named_parameters():
            local = param.to_local() if isinstance(param, DTensor) else param
            src = ours[name]
            if local.shape != src.shape:
                raise SystemExit(f"{name}: native shard {tuple(local.shape)} vs ours {tuple(src.shape)}")
            local.copy_(src)


class Native:
    """The native side on this rank: the TP-parallelized stage in DDP over ``dp``, its ``PipelineStage``
    in a ``Schedule1F1B``, AdamW with the trainer's parameter groups, and the global-norm clipping."""

    def __init__(self, cfg, run, mesh, microbatches: int, sp: bool) -> None:
        chunk = run.chunks[0]
        pp_rank = mesh["pp"].get_local_rank()
        self.first, self.last = chunk.stage.embedding, chunk.stage.head
        stage = Stage(cfg, TP, len(chunk.layers), first=self.first, last=self.last)
        parallelize_module(stage, mesh["tp"], tp_plan(stage, sp))
        copy_local_weights(stage, chunk)
        self.sharded = {n for n, p in stage.named_parameters() if isinstance(p, DTensor) and p.placements[0].is_shard()}
        # a dp mesh sliced from the 3-D mesh: DDP applies torch's TP + DDP transform (DTensor parameters
        # to local tensors for its buckets, rebuilt as DTensors in each forward)
        module = DistributedDataParallel(stage, device_mesh=mesh["dp"])
        names = [n.removeprefix("module.") for n, _ in module.named_parameters()]
        self.params = dict(zip(names, module.parameters()))
        o = run.cfg.optim
        self.optimizer = torch.optim.AdamW(
            [{**g, "params": [p for _, p in g["params"]]} for g in param_groups(self.params, o.weight_decay)],
            lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
        )  # fmt: skip
        self.clip = o.clip_grad or math.inf
        self.mesh = mesh
        self.pipe = PipelineStage(module, pp_rank, PP, torch.device("cpu"), group=mesh["pp"].get_group())
        # scale_grads=True would divide the gradients of submod.parameters(), which DDP's TP transform
        # has emptied after the first forward: the loss is divided instead
        self.microbatches = microbatches
        self.schedule = Schedule1F1B(self.pipe, microbatches, loss_fn=self.loss_fn, scale_grads=False)

    def loss_fn(self, logits, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(0, 1)) / self.microbatches

    def step(self, ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        """One optimizer step over this rank's micro-batches (concatenated along the batch): the global
        mean loss and the global gradient norm."""
        self.optimizer.zero_grad(set_to_none=True)
        losses: list[torch.Tensor] = []
        with loss_parallel():
            if self.first:
                self.schedule.step(ids)
            else:
                self.schedule.step(target=labels, losses=losses)
        norm = self.clip_grads()
        self.optimizer.step()
        return self.global_loss(losses), norm

    def clip_grads(self) -> float:
        """Clip by the global norm: squares of TP shards summed over ``tp``, then stages over ``pp``."""
        sharded, replicated = torch.zeros(()), torch.zeros(())
        for name, p in self.params.items():
            if name in self.sharded:
                sharded += p.grad.pow(2).sum()
            else:
                replicated += p.grad.pow(2).sum()
        dist.all_reduce(sharded, group=self.mesh["tp"].get_group())
        total = sharded + replicated
        dist.all_reduce(total, group=self.mesh["pp"].get_group())
        norm = total.sqrt().item()
        if norm > self.clip:
            for p in self.params.values():
                p.grad.mul_(self.clip / (norm + 1e-6))
        return norm

    def global_loss(self, losses: list[torch.Tensor]) -> float:
        counts = self.last and self.mesh["tp"].get_local_rank() == 0
        value = float(sum(x.item() for x in losses)) * self.microbatches if counts else 0.0
        total = torch.tensor([value, len(losses) if counts else 0.0])
        dist.all_reduce(total)
        return (total[0] / total[1]).item()


def rank_batches(cfg, args: argparse.Namespace, dp_rank: int, step: int) -> list[np.ndarray]:
    """This data-parallel rank's micro-batches of ``[micro_batch, seq + 1]`` tokens for ``step``."""
    g = np.random.default_rng([step, dp_rank])
    return [g.integers(0, cfg.vocab_size, (args.micro_batch, args.seq + 1)) for _ in range(args.microbatches)]


def measure(cfg, args: argparse.Namespace) -> dict:
    """On every rank: build both sides from the same weights, check their first two steps agree, then
    time them in alternating rounds."""
    torch.manual_seed(0)
    run_cfg = RunConfig(
        model=cfg,
        parallel=pstate.ParallelConfig(tp=TP, pp=PP),
        train=TrainConfig(
            seq_len=args.seq, micro_batch=args.micro_batch, global_batch=args.micro_batch * args.microbatches * DP,
            sequence_parallel=args.sequence_parallel,
        ),
        optim=OptimConfig(),
    )  # fmt: skip
    with pstate.initialize(run_cfg.parallel) as ps:
        run = setup(run_cfg, ps, cfg, check_run(run_cfg, dist.get_world_size()))
        mesh = init_device_mesh("cpu", (PP, DP, TP), mesh_dim_names=("pp", "dp", "tp"))
        coords = tuple(mesh[n].get_local_rank() for n in ("pp", "dp", "tp"))
        if coords != (ps.pp.rank, ps.dp.rank, ps.tp.rank):
            raise SystemExit(f"rank {dist.get_rank()}: mesh coordinates {coords} differ from pstate's")
        native = Native(cfg, run, mesh, args.microbatches, args.sequence_parallel)

        def ours(step: int) -> tuple[float, float]:
            loss, norm, _ = train_step(run, rank_batches(cfg, args, ps.dp.rank, step))
            return loss, norm

        def theirs(step: int) -> tuple[float, float]:
            tokens = torch.from_numpy(np.concatenate(rank_batches(cfg, args, ps.dp.rank, step)))
            return native.step(tokens[:, :-1], tokens[:, 1:])

        check = [(ours(step), theirs(step)) for step in range(2)]  # global values: the same on every rank
        for step, (a, b) in enumerate(check):
            if not np.allclose(a, b, rtol=args.rtol, atol=0.0):
                raise AssertionError(f"step {step + 1}: (loss, grad norm) ours {a} vs native {b}, rtol {args.rtol}")
        times: dict[str, list[float]] = {"ours": [], "native": []}
        for _ in range(args.rounds):
            for name, step_fn in (("ours", ours), ("native", theirs)):
                step_fn(0)  # warm-up
                dist.barrier()
                start = time.perf_counter()
                for i in range(args.iters):
                    step_fn(i)
                elapsed = torch.tensor([time.perf_counter() - start])
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                times[name].append(elapsed.item() / args.iters)
    return {"check": check, "times": {k: statistics.median(v) for k, v in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--sequence-parallel", action="store_true")
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rtol", type=float, default=1e-4)
    args = parser.parse_args()
    cfg = preset("tiny").with_overrides(
        hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
        ffn_hidden=None, vocab_size=args.vocab, max_seq_len=args.seq,
    )  # fmt: skip
    if cfg.vocab_size % TP:
        raise SystemExit(f"--vocab {args.vocab} must be divisible by tp={TP} (no padding rows on either side)")
    began = time.perf_counter()
    with Harness(timeout_s=1800, threads=1) as harness:
        result = harness.run(TP * PP * DP, measure, cfg, args)[0]
    tokens = args.micro_batch * args.microbatches * DP * args.seq
    sp = ", sequence parallel" if args.sequence_parallel else ""
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, 8 gloo ranks of one thread: TP2 x PP2 x DP2{sp}")
    print(
        f"hidden {cfg.hidden}, layers {cfg.layers}, heads {cfg.heads}/{cfg.num_kv_heads}, ffn {cfg.ffn}, "
        f"vocab {cfg.vocab_size}; seq {args.seq}, micro-batch {args.micro_batch} x {args.microbatches} "
        f"micro-batches x dp {DP} = {tokens} tokens/step; {args.iters} steps x {args.rounds} rounds"
    )
    for step, (ours, native) in enumerate(result["check"]):
        print(
            f"step {step + 1}: loss ours {ours[0]:.6f} native {native[0]:.6f}; "
            f"grad norm ours {ours[1]:.6f} native {native[1]:.6f}"
        )
    t_ours, t_native = result["times"]["ours"], result["times"]["native"]
    print(f"{'':8}{'ms/step':>10}{'tokens/s':>10}")
    for name, t in (("ours", t_ours), ("native", t_native)):
        print(f"{name:8}{t * 1e3:10.1f}{tokens / t:10.0f}")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"ratio ours/native (tokens/s): {t_native / t_ours:.2f}; wall {time.perf_counter() - began:.0f} s")
    print(f"load average after the run (1, 5, 15 min): {load}")


if __name__ == "__main__":
    main()

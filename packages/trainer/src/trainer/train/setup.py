"""From a checked :class:`RunConfig` and a ``ParallelState`` to the parts of a run: the model chunks, their
data-parallel wrapping, the optimizer and the pipeline executor.

``zero=0``: each chunk in :class:`dp_shard.DataParallel` (bucketed all-reduce over ``dp_cp``, experts
over ``edp``) and ``torch.optim.AdamW``. ``zero=1/2``: :class:`dp_shard.ShardedOptimizer` owns the
gradient reduction (dense parameters sharded over ``dp_cp``, experts over ``edp``). Mixed precision
(``bf16``/``fp16``) is autocast compute over fp32 parameters, which are the master weights; ``fp16``
adds a dynamic :class:`dp_shard.LossScaler`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dp_shard import DataParallel, LossScaler, ShardedOptimizer, fully_shard
from pp_sched import PipelineExecutor
from pstate import ParallelState
from pstate.device import device_for_backend
from tp_layers import reduce_sequence_parallel_grads_in_backward

from ..config import RunConfig
from ..model import GPTChunk, ModelConfig, ModelGroups, build_chunks, tied_embedding_params
from ..model.shards import Piece, model_pieces
from .pipeline import make_executor, stage_layout

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Run:
    """Everything the loop steps: ``chunks`` (the bare model chunks, for checkpoints), ``modules`` (what
    the executor calls: wrapped or bare), the optimizer, the executor, the loss scaler (fp16) and the
    ``device`` the model and its batches are on."""

    cfg: RunConfig
    model: ModelConfig
    ps: ParallelState
    groups: ModelGroups
    chunks: list[GPTChunk]
    modules: list[nn.Module]
    optimizer: torch.optim.Optimizer
    executor: PipelineExecutor
    microbatches: int
    scaler: LossScaler | None = None
    named: dict[str, nn.Parameter] = field(default_factory=dict)
    fsdp_pieces: list[dict[str, list[Piece]]] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def sharded(self) -> bool:
        return isinstance(self.optimizer, ShardedOptimizer)

    @property
    def fsdp(self) -> bool:
        """Whether the chunks are fully sharded (ZeRO-3): ``fsdp_pieces`` then maps, per chunk, each
        original parameter name to its named pieces (taken before sharding)."""
        return self.fsdp_pieces is not None


class Autocast(nn.Module):
    """Runs ``module``'s forward under autocast to ``dtype`` (its backward then follows the same casts);
    the parameters stay fp32 and are the master weights. Other attributes come from ``module``."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, *args: Any) -> Any:
        device = next(self.module.parameters()).device
        with torch.autocast(device.type, dtype=self.dtype):
            return self.module(*args)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def param_groups(
    named: dict[str, nn.Parameter], weight_decay: float, decayed: set[str] | None = None
) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices, none on biases, norms and other vectors (``decayed``:
    the names to decay, when the parameters no longer have their shapes, as FSDP's 1-D pieces)."""
    decayed = {n for n, p in named.items() if p.dim() >= 2} if decayed is None else decayed
    decay = [(n, p) for n, p in named.items() if n in decayed]
    plain = [(n, p) for n, p in named.items() if n not in decayed]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def setup(cfg: RunConfig, ps: ParallelState, model: ModelConfig, microbatches: int) -> Run:
    """Build the run's model chunks, wrappers, optimizer and executor (collective over the world)."""
    t, o = cfg.train, cfg.optim
    groups = ModelGroups.from_state(ps, sequence_parallel=t.sequence_parallel, cp_attention=t.cp_attention)
    chunks = build_chunks(
        model,
        groups,
        pp_rank=ps.pp.rank,
        pp=ps.pp.size,
        vpp=cfg.parallel.vpp,
        seed=t.seed,
        recompute=t.recompute,
        layout=stage_layout(t.pipeline_schedule, ps.pp.size),
        uneven=cfg.parallel.pipeline_layout,
    )
    device = device_for_backend(dist.get_backend())  # the CPU under gloo, this rank's GPU under NCCL
    for chunk in chunks:
        chunk.to(device)
    named = {f"chunk{i}.{n}": p for i, c in enumerate(chunks) for n, p in c.named_parameters()}
    adam = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    # an overflow on any rank skips the step on every rank
    scaler = LossScaler(groups=[ps.world]) if t.precision == "fp16" else None
    if t.zero == 0:
        has_experts = model.num_experts > 0
        modules: list[nn.Module] = [
            DataParallel(c, group=ps.dp_cp, expert_group=ps.edp if has_experts else None) for c in chunks
        ]
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(
            [{**g, "params": [p for _, p in g["params"]]} for g in param_groups(named, o.weight_decay)], **adam
        )
        no_sync = lambda chunk: modules[chunk].no_sync()  # noqa: E731
    elif t.zero in (1, 2):
        if t.sequence_parallel:  # the sharded reduction takes gradients during backward: complete them first
            for chunk in chunks:
                reduce_sequence_parallel_grads_in_backward(chunk, group=ps.tp)
        modules = list(chunks)
        optimizer = ShardedOptimizer(
            param_groups(named, o.weight_decay),
            torch.optim.AdamW,
            group=ps.dp_cp,
            stage=t.zero,
            aligned=tied_embedding_params(chunks),  # both stages then own the same elements of the copies
            expert_group=ps.edp if model.num_experts > 0 else None,  # experts sharded over edp
            **adam,
        )
        no_sync = None
    else:
        decayed = {n for n, p in named.items() if p.dim() >= 2}
        fsdp_pieces = [_pieces_by_name(c) for c in chunks]
        for c in chunks:
            fully_shard(c, group=ps.dp_cp, units=_fsdp_units(c))  # the pieces keep the parameters' tags
        named = {f"chunk{i}.{n}": p for i, c in enumerate(chunks) for n, p in c.named_parameters()}
        optimizer = torch.optim.AdamW(
            [{**g, "params": [p for _, p in g["params"]]} for g in param_groups(named, o.weight_decay, decayed)], **adam
        )
        modules, no_sync = list(chunks), None
    if t.precision != "fp32":
        modules = [Autocast(m, AUTOCAST[t.precision]) for m in modules]
    scale = None if scaler is None else (lambda: scaler.scale)
    executor = make_executor(
        modules, ps, model, groups, schedule=t.pipeline_schedule, microbatches=microbatches, no_sync=no_sync,
        loss_scale=scale,
    )  # fmt: skip
    run = Run(cfg, model, ps, groups, chunks, modules, optimizer, executor, microbatches, scaler, named)
    run.fsdp_pieces = fsdp_pieces if t.zero == 3 else None
    run.device = device
    return run


def _fsdp_units(chunk: GPTChunk) -> list[nn.Module]:
    """A chunk's FSDP units: each transformer layer, the final norm and, where nothing but its own
    forward uses it, the embedding table; the root keeps the rest. So a tied embedding's two copies (in
    the first stage's embedding unit, and alone in the last stage's root, where the head uses it outside
    the embedding's forward) lie alike in their flat shards, and their gradient pieces are summed
    element by element over the embedding group."""
    units: list[nn.Module] = [*chunk.layers]
    if chunk.final_norm is not None:
        units.append(chunk.final_norm)
    if chunk.stage.embedding and not (chunk.stage.head and chunk.cfg.tied_embeddings):
        units.append(chunk.embedding)
    return units


def _pieces_by_name(chunk: GPTChunk) -> dict[str, list[Piece]]:
    """Each parameter's named pieces, by the parameter's name in ``chunk`` (what FSDP keys it by)."""
    names = {id(p): n for n, p in chunk.named_parameters()}
    out: dict[str, list[Piece]] = {}
    for piece in model_pieces([chunk]):
        out.setdefault(names[id(piece.param)], []).append(piece)
    return out

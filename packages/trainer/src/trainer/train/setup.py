"""From a checked :class:`RunConfig` and a ``ParallelState`` to the parts of a run: the model chunks, their
data-parallel engine (with the optimizer) and the pipeline executor.

The engine (:func:`dp_shard.make_engine`) is one interface whatever ``zero`` is: DDP (``zero=0``, bucketed
all-reduce over ``dp_cp``), ZeRO-1/2 (a sharded optimizer owns the reduction) or ZeRO-3 (fully sharded
chunks over ``dp_shard``: ``dp_cp`` itself, or for HSDP (``parallel.dp_shard``) a slice of it, replicated
across ``dp_replicate``); experts are reduced (and sharded) over ``edp``. Mixed precision
(``bf16``/``fp16``) is autocast compute over fp32 parameters, which are the master weights (ZeRO-3
gathers them in the 16-bit dtype and reduces gradients in ``train.grad_reduce_dtype``); ``fp16`` adds a dynamic
:class:`dp_shard.LossScaler`; ``fp8`` is ``bf16`` with fp8 matmuls (:func:`trainer.model.apply_backend`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dp_shard import DataParallelEngine, LossScaler, ZeroEngine, make_engine
from pp_sched import PipelineExecutor
from pstate import ParallelState
from pstate.device import device_for_backend

from ..config import RunConfig, TrainConfig
from ..model import GPTChunk, ModelConfig, ModelGroups, apply_backend, build_chunks, tied_embedding_params
from ..model.shards import Piece, model_pieces
from .expert_bias import ExpertBiasUpdater
from .pipeline import LossParts, make_executor, stage_layout

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}
REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Run:
    """Everything the loop steps: ``chunks`` (the bare model chunks, for checkpoints), ``modules`` (what
    the executor calls: the engine's, under autocast for bf16/fp16), the data-parallel ``engine`` (one
    interface whatever the ZeRO stage), the executor, the loss scaler (fp16), the ``device`` the model
    and its batches are on, the MoE routers' expert-bias updater (``model.moe_expert_bias``), and the
    executor's per-micro-batch main and MTP ``losses`` (cleared before each step)."""

    cfg: RunConfig
    model: ModelConfig
    ps: ParallelState
    groups: ModelGroups
    chunks: list[GPTChunk]
    modules: list[nn.Module]
    engine: DataParallelEngine
    executor: PipelineExecutor
    microbatches: int
    scaler: LossScaler | None = None
    fsdp_pieces: list[dict[str, list[Piece]]] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    expert_bias: ExpertBiasUpdater | None = None
    losses: LossParts = field(default_factory=LossParts)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer

    @property
    def named(self) -> dict[str, nn.Parameter]:
        return self.engine.named

    @property
    def sharded(self) -> bool:
        """Whether optimizer state is sharded by ZeRO-1/2 (checkpoints take it from its state dict)."""
        return isinstance(self.engine, ZeroEngine)

    @property
    def fsdp(self) -> bool:
        """Whether the chunks are fully sharded (ZeRO-3): ``fsdp_pieces`` then maps, per chunk, each
        original parameter name to its named pieces (taken before sharding)."""
        return self.fsdp_pieces is not None


class Autocast(nn.Module):
    """Runs ``module``'s forward under autocast to ``dtype`` (its backward then follows the same casts);
    the parameters stay fp32 and are the master weights; ``context`` (Transformer Engine's fp8 autocast)
    is entered inside. Other attributes come from ``module``."""

    def __init__(
        self, module: nn.Module, dtype: torch.dtype, context: Callable[[], AbstractContextManager] | None = None
    ) -> None:
        super().__init__()
        self.module, self.dtype, self.context = module, dtype, context

    def forward(self, *args: Any) -> Any:
        device = next(self.module.parameters()).device
        with torch.autocast(device.type, dtype=self.dtype), self.context() if self.context else nullcontext():
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
    groups = ModelGroups.from_state(
        ps, sequence_parallel=t.sequence_parallel, cp_attention=t.cp_attention, cp_kernel=t.cp_kernel
    )
    chunks = build_chunks(
        model,
        groups,
        pp_rank=ps.pp.rank,
        pp=ps.pp.size,
        vpp=cfg.parallel.vpp,
        seed=t.seed,
        recompute=t.recompute,
        draw=t.init_from_hf is None,
        layout=stage_layout(t.pipeline_schedule, ps.pp.size),
        uneven=cfg.parallel.pipeline_layout,
    )
    if t.init_from_hf is not None:  # each rank reads only its pieces of the Hugging Face weights
        from ..hf.stream import load_hf_pieces

        load_hf_pieces(chunks, t.init_from_hf)
    device = device_for_backend(dist.get_backend())  # the CPU under gloo, this rank's GPU under NCCL
    for chunk in chunks:
        chunk.to(device)
    context = apply_backend(
        chunks, groups, backend=model.backend, precision=t.precision, fp8_recipe=t.fp8_recipe,
        amax_group=ps.tp_dp_cp.group,
    )  # fmt: skip
    named = {f"chunk{i}.{n}": p for i, c in enumerate(chunks) for n, p in c.named_parameters()}
    adam = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    # an overflow on any rank skips the step on every rank
    scaler = LossScaler(groups=[ps.world]) if t.precision == "fp16" else None
    decayed = {n for n, p in named.items() if p.dim() >= 2}  # by name: FSDP's pieces are 1-D
    fsdp_pieces = [_pieces_by_name(c) for c in chunks] if t.zero == 3 else None  # taken before sharding
    engine = make_engine(
        t.zero,
        chunks,
        group=ps.dp_shard if t.zero == 3 else ps.dp_cp,  # dp_shard: a slice of dp_cp under HSDP, else dp_cp
        expert_group=ps.edp if model.num_experts > 0 else None,  # experts reduced (and sharded) over edp
        param_groups=lambda named: param_groups(named, o.weight_decay, decayed),
        optimizer_cls=torch.optim.AdamW,
        aligned=tied_embedding_params(chunks),  # ZeRO-1/2: both stages own the same elements of the copies
        units=_fsdp_units,
        **(_fsdp_options(t, ps) if t.zero == 3 else {}),
        **adam,
    )
    modules = engine.modules
    if t.precision != "fp32":
        modules = [Autocast(m, AUTOCAST[t.precision], context) for m in modules]
    scale = None if scaler is None else (lambda: scaler.scale)
    losses, last_stage = LossParts(), next((c for c in chunks if c.mtp is not None), None)
    executor = make_executor(
        modules, ps, model, groups, schedule=t.pipeline_schedule, microbatches=microbatches, no_sync=engine.no_sync,
        loss_scale=scale, last_stage=last_stage, parts=losses, autocast=AUTOCAST.get(t.precision),
    )  # fmt: skip
    # the ranks of the stage that route other tokens: DP (EP included), CP, and TP under SP
    tokens_group = ps.tp_dp_cp if t.sequence_parallel else ps.dp_cp
    bias = ExpertBiasUpdater(chunks, tokens_group, model.moe_expert_bias_rate) if model.moe_expert_bias else None
    return Run(
        cfg, model, ps, groups, chunks, modules, engine, executor, microbatches, scaler, fsdp_pieces, device, bias,
        losses,
    )  # fmt: skip


def _fsdp_options(t: TrainConfig, ps: ParallelState) -> dict[str, Any]:
    """ZeRO-3's replicas (HSDP) and dtypes: 16-bit runs gather the parameters in the model dtype (the
    fp32 shards stay the master weights, and AdamW's state with them), gradients are reduced in
    ``train.grad_reduce_dtype``; fp8 keeps fp32 gathers (its matmuls cast the weights themselves)."""
    return {
        "replicate_group": ps.dp_replicate,
        "param_dtype": AUTOCAST[t.precision] if t.precision in ("bf16", "fp16") else None,
        "reduce_dtype": REDUCE_DTYPES[t.grad_reduce_dtype],
    }


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

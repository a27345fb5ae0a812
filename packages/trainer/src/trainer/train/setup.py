"""From a checked :class:`RunConfig`, its :class:`RunPlan` and a ``ParallelState`` to the parts of a run:
the model chunks, their data-parallel engine (with the optimizer) and the pipeline executor.

:func:`setup` is the list of steps, each a short function with one purpose: :func:`build_model`,
:func:`apply_device`, the model's backend (:func:`trainer.model.apply_backend`), :func:`named_pieces`,
:func:`apply_data_parallel` (the engine), :func:`apply_precision`, :func:`loss_scaler`,
:func:`apply_pipeline` (the executor) and :func:`expert_bias`.

The engine (:func:`dp_shard.make_engine`) is one interface whatever ``zero`` is: DDP (``zero=0``, bucketed
all-reduce over ``dp_cp``), ZeRO-1/2 (a sharded optimizer owns the reduction) or ZeRO-3 (fully sharded
chunks over ``dp_shard``: ``dp_cp`` itself, or for HSDP (``parallel.dp_shard``) a slice of it, replicated
across ``dp_replicate``); experts are reduced (and sharded) over ``edp``. The engine sums the gradients
over the data-parallel ranks and :func:`loss_weight` weights each micro-batch's loss by ``1/dp_cp``, so a
rank's 16-bit gradients are the ones one process computes for the micro-batch. ``bf16`` and ``fp16`` with
``zero`` 0/1/2 are Megatron's mixed precision: 16-bit weights, gradients accumulated and reduced in fp32
main-gradient buffers (``train.grad_reduce_dtype="bf16"`` reduces in bf16), fp32 master weights and AdamW
state (sharded by ZeRO). With ``zero=3`` the fp32 shards are the masters, gathered in the 16-bit dtype,
gradients reduced in ``train.grad_reduce_dtype``. The forward runs under autocast to the 16-bit dtype
(the ops autocast keeps in fp32 stay there). ``fp16`` adds a dynamic :class:`dp_shard.LossScaler` over the
fp32 main gradients; ``fp8`` is ``bf16`` autocast over fp32 parameters with fp8 matmuls
(:func:`trainer.model.apply_backend`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dp_shard import DataParallelEngine, LossScaler, make_engine
from pp_sched import PipelineExecutor
from pstate import ParallelState
from pstate.device import device_for_backend

from ..config import RunConfig, RunPlan, TrainConfig
from ..model import GPTChunk, ModelConfig, ModelGroups, apply_backend, build_chunks, tied_embedding_params
from ..model.shards import Piece, model_pieces
from .expert_bias import ExpertBiasUpdater
from .pipeline import LossParts, make_executor, stage_layout

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}
WEIGHTS = {"bf16": torch.bfloat16, "fp16": torch.float16}  # the model's weights under zero 0/1/2
REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Run:
    """Everything the loop steps: the resolved ``plan`` (:func:`trainer.config.check_run`), ``chunks`` (the
    bare model chunks), ``modules`` (what the executor calls: the engine's, under autocast for bf16/fp16),
    the data-parallel ``engine`` (one interface whatever the ZeRO stage), the executor, the loss scaler
    (fp16), ``pieces`` (each of the engine's parameter names to its layout-free named pieces, taken
    before any sharding: what checkpoints split the engine's pieces along), the ``device`` the model and
    its batches are on, the MoE routers' expert-bias updater (``model.moe_expert_bias``), and the
    executor's per-micro-batch main and MTP ``losses`` (cleared before each step)."""

    cfg: RunConfig
    model: ModelConfig
    ps: ParallelState
    groups: ModelGroups
    chunks: list[GPTChunk]
    modules: list[nn.Module]
    engine: DataParallelEngine
    executor: PipelineExecutor
    plan: RunPlan
    scaler: LossScaler | None = None
    pieces: dict[str, list[Piece]] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    expert_bias: ExpertBiasUpdater | None = None
    losses: LossParts = field(default_factory=LossParts)

    @property
    def microbatches(self) -> int:
        return self.plan.microbatches

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.engine.optimizer

    @property
    def named(self) -> dict[str, nn.Parameter]:
        return self.engine.named


class Autocast(nn.Module):
    """Runs ``module``'s forward under autocast to ``dtype`` (its backward then follows the same casts), over
    16-bit weights or fp32 parameters alike (the ops autocast keeps in fp32 stay there); ``context``
    (Transformer Engine's fp8 autocast) is entered inside. Other attributes come from ``module``."""

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


def setup(
    cfg: RunConfig, ps: ParallelState, model: ModelConfig, plan: RunPlan, *, device: torch.device | None = None
) -> Run:
    """Build the run's parts, one step each (collective over the world): the model chunks, their
    backend, the named pieces, the data-parallel engine (with the optimizer), the precision wrappers,
    the pipeline executor and the expert-bias updater.

    ``device``: where the model lives (default: the process group's device). ``meta`` (entered as the
    default device around the call, as dry runs do) builds every tensor from its shape and dtype alone."""
    meta = device is not None and torch.device(device).type == "meta"
    groups = model_groups(cfg, ps, plan)
    chunks = build_model(cfg, ps, model, groups, plan, meta=meta)
    device = apply_device(chunks, device)
    apply_param_dtype(chunks, plan.param_dtype)
    context = apply_backend(
        chunks, groups, backend=model.backend, precision=cfg.train.precision, fp8_recipe=cfg.train.fp8_recipe,
        amax_group=ps.tp_dp_cp.group,
    )  # fmt: skip
    pieces = named_pieces(chunks)  # before the engine shards anything
    engine = apply_data_parallel(cfg, ps, model, chunks)
    modules = apply_precision(engine.modules, cfg.train.precision, context)
    scaler = loss_scaler(cfg, ps)
    losses = LossParts()
    executor = apply_pipeline(cfg, ps, model, groups, plan, chunks, modules, engine, scaler, losses)
    bias = expert_bias(cfg, ps, model, chunks)
    return Run(cfg, model, ps, groups, chunks, modules, engine, executor, plan, scaler, pieces, device, bias, losses)


def model_groups(cfg: RunConfig, ps: ParallelState, plan: RunPlan) -> ModelGroups:
    """The process groups and parallel options the model's layers take (the plan's CP attention)."""
    return ModelGroups.from_state(
        ps,
        sequence_parallel=plan.sequence_parallel,
        cp_attention=plan.cp_attention,
        cp_kernel=cfg.train.cp_kernel,
        keep_gathered_input=cfg.train.keep_gathered_input,
    )


def build_model(
    cfg: RunConfig, ps: ParallelState, model: ModelConfig, groups: ModelGroups, plan: RunPlan, *, meta: bool = False
) -> list[GPTChunk]:
    """This rank's model chunks (its stage's layers, as the plan lays them out; TP/EP slices), drawn from the
    seed or, with ``train.init_from_hf``, read piece by piece from the Hugging Face weights; ``meta``: shapes only."""
    t = cfg.train
    chunks = build_chunks(
        model,
        groups,
        pp_rank=ps.pp.rank,
        pp=ps.pp.size,
        vpp=plan.vpp,
        seed=t.seed,
        recompute=t.recompute,
        draw=t.init_from_hf is None and not meta,
        layout=stage_layout(t.pipeline_schedule, ps.pp.size),
        uneven=plan.pipeline_layout,
    )
    if t.init_from_hf is not None and not meta:  # each rank reads only its pieces of the Hugging Face weights
        from ..hf.stream import load_hf_pieces

        load_hf_pieces(chunks, t.init_from_hf)
    return chunks


def apply_device(chunks: list[GPTChunk], device: torch.device | None = None) -> torch.device:
    """Move the chunks to ``device`` (default: this rank's, the CPU under gloo, its GPU under NCCL); return it."""
    device = device_for_backend(dist.get_backend()) if device is None else torch.device(device)
    for chunk in chunks:
        chunk.to(device)
    return device


def apply_param_dtype(chunks: list[GPTChunk], dtype: str) -> None:
    """The plan's stored parameter dtype (bf16 or fp16 with ZeRO 0/1/2: the engine keeps fp32 masters and
    main gradients); parameters only: buffers (rotary tables, expert biases) keep theirs."""
    if dtype == "fp32":
        return
    for chunk in chunks:
        for p in chunk.parameters():
            p.data = p.data.to(WEIGHTS[dtype])


def named_pieces(chunks: list[GPTChunk]) -> dict[str, list[Piece]]:
    """Each parameter's layout-free named pieces, by the name the engine gives it (``chunk{i}.{name}``)."""
    out: dict[str, list[Piece]] = {}
    for i, chunk in enumerate(chunks):
        for name, pieces in _pieces_by_name(chunk).items():
            out[f"chunk{i}.{name}"] = pieces
    return out


def apply_data_parallel(
    cfg: RunConfig, ps: ParallelState, model: ModelConfig, chunks: list[GPTChunk]
) -> DataParallelEngine:
    """The data-parallel engine of ``train.zero`` over ``dp_cp`` (experts over ``edp``), with AdamW."""
    t, o = cfg.train, cfg.optim
    named = {f"chunk{i}.{n}": p for i, c in enumerate(chunks) for n, p in c.named_parameters()}
    decayed = {n for n, p in named.items() if p.dim() >= 2}  # by name: FSDP's pieces are 1-D
    return make_engine(
        t.zero,
        chunks,
        group=ps.dp_shard if t.zero == 3 else ps.dp_cp,  # dp_shard: a slice of dp_cp under HSDP, else dp_cp
        expert_group=ps.edp if model.num_experts > 0 else None,  # experts reduced (and sharded) over edp
        param_groups=lambda named: param_groups(named, o.weight_decay, decayed),
        optimizer_cls=torch.optim.AdamW,
        aligned=tied_embedding_params(chunks),  # ZeRO-1/2: both stages own the same elements of the copies
        units=_fsdp_units,
        reduce_dtype=REDUCE_DTYPES[t.grad_reduce_dtype],  # every mode's gradient reduction
        overlap_param_gather=True,  # ZeRO-1/2: the next forward waits for each bucket of weights it uses
        average=False,  # summed over the ranks: each rank's losses are weighted by 1 / dp_cp (loss_weight)
        **(_fsdp_options(t, ps) if t.zero == 3 else {}),
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
    )


def apply_precision(
    modules: list[nn.Module], precision: str, context: Callable[[], AbstractContextManager] | None
) -> list[nn.Module]:
    """bf16/fp16/fp8: the modules' forwards under autocast (over the 16-bit weights, or for ZeRO-3 and fp8
    the fp32 parameters, which are then the master weights)."""
    if precision == "fp32":
        return modules
    return [Autocast(m, AUTOCAST[precision], context) for m in modules]


def loss_scaler(cfg: RunConfig, ps: ParallelState) -> LossScaler | None:
    """fp16's dynamic loss scaler; an overflow on any rank skips the step on every rank."""
    return LossScaler(groups=[ps.world]) if cfg.train.precision == "fp16" else None


def loss_weight(ps: ParallelState, scaler: LossScaler | None) -> float:
    """What each micro-batch's loss is multiplied by before backward, besides the executor's
    ``1 / microbatches``: the loss scale (fp16) over the data-parallel size ``dp_cp``. The engine sums the
    gradients over ``dp_cp`` (``average=False``), so the step's gradient is the mean over every micro-batch
    of the global batch, and each micro-batch's 16-bit parameter gradients are those one process computes:
    with the data-parallel average applied after backward, a rank's fp16 gradients would be ``dp_cp`` times
    the one-process run's and overflow at a loss scale that run passes (the fp16 embedding gradient does at
    DP2 and the default scale), skipping other steps."""
    return (1.0 if scaler is None else scaler.scale) / ps.dp_cp.size


def apply_pipeline(
    cfg: RunConfig,
    ps: ParallelState,
    model: ModelConfig,
    groups: ModelGroups,
    plan: RunPlan,
    chunks: list[GPTChunk],
    modules: list[nn.Module],
    engine: DataParallelEngine,
    scaler: LossScaler | None,
    losses: LossParts,
) -> PipelineExecutor:
    """The executor running the plan's schedule over ``modules`` (accumulating inside the engine's
    ``no_sync``), recording each micro-batch's losses in ``losses``."""
    t = cfg.train
    scale = lambda: loss_weight(ps, scaler)  # noqa: E731
    last_stage = next((c for c in chunks if c.mtp is not None), None)
    return make_executor(
        modules, ps, model, groups, schedule=t.pipeline_schedule, microbatches=plan.microbatches,
        no_sync=engine.no_sync, loss_scale=scale, last_stage=last_stage, parts=losses,
        autocast=AUTOCAST.get(t.precision), overlap=t.moe_overlap,
    )  # fmt: skip


def expert_bias(
    cfg: RunConfig, ps: ParallelState, model: ModelConfig, chunks: list[GPTChunk]
) -> ExpertBiasUpdater | None:
    """The MoE routers' aux-loss-free bias updater (``model.moe_expert_bias``), else ``None``."""
    if not model.moe_expert_bias:
        return None
    # the ranks of the stage that route other tokens: DP (EP included), CP, and TP under SP
    tokens_group = ps.tp_dp_cp if cfg.train.sequence_parallel else ps.dp_cp
    return ExpertBiasUpdater(chunks, tokens_group, model.moe_expert_bias_rate)


def _fsdp_options(t: TrainConfig, ps: ParallelState) -> dict[str, Any]:
    """ZeRO-3's replicas (HSDP) and gather dtype: 16-bit runs gather the parameters in the model dtype (the
    fp32 shards stay the master weights, and AdamW's state with them; gradients are reduced in
    ``train.grad_reduce_dtype``, as in every mode); fp8 keeps fp32 gathers (its matmuls cast the weights themselves)."""
    return {
        "replicate_group": ps.dp_replicate,
        "param_dtype": AUTOCAST[t.precision] if t.precision in ("bf16", "fp16") else None,
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

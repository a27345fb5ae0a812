"""One step's forwards and backwards over micro-batches, through the pipeline executor at every PP size.

The same code runs ``pp=1`` (a one-stage schedule) and ``pp>1``, so there is one path to test. After the
backwards, :func:`sync_model_parallel_grads` completes the gradients that the model's split leaves
partial: sequence-parallel parameters (summed over TP) and tied embedding copies (summed over the
``embedding`` group, first and last stage). The data-parallel reduction is the wrapper's job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import cp_ring
from moe_dispatch import TopKRouter
from pp_sched import V_SCHEDULES, PipelineExecutor, build
from pstate import ParallelState, comm
from tp_layers import allreduce_sequence_parallel_grads, sequence_parallel_params

from ..errors import TrainerError
from ..model import GPTChunk, ModelConfig, ModelGroups, documents_tensor, lm_loss, tied_embedding_params
from ..model.mtp import mtp_loss
from ..model.shards import gradient


def stage_layout(schedule: str, pp: int) -> str:
    """How ``schedule`` places the model's stages on the pipeline ranks: ``"v"`` for the V schedules
    (ZB-V, DualPipe-V: two chunks per rank, the first and last stage on rank 0), else ``"looped"``."""
    return "v" if schedule in V_SCHEDULES and pp > 1 else "looped"


def make_executor(
    chunks: Sequence[nn.Module],
    ps: ParallelState,
    cfg: ModelConfig,
    groups: ModelGroups,
    *,
    schedule: str,
    microbatches: int,
    no_sync: Callable[[int], AbstractContextManager[Any]] | None = None,
    on_chunk_grads_ready: Callable[[int], None] | None = None,
    loss_scale: Callable[[], float] | None = None,
    last_stage: GPTChunk | None = None,
    parts: LossParts | None = None,
    autocast: torch.dtype | None = None,
    overlap: bool = False,
) -> PipelineExecutor:
    """The executor of ``schedule`` (``1f1b`` etc.; any name gives a one-stage schedule at ``pp=1``).

    ``loss_scale()`` multiplies the loss before backward (fp16 dynamic loss scaling). With MTP
    (``model.mtp_depth > 0``) the loss is the main loss plus ``mtp_loss_weight`` times the MTP loss, which
    the MTP modules of ``last_stage`` (this rank's last-stage chunk; found among ``chunks`` when they are bare)
    compute from the last stage's hidden state, under autocast to ``autocast`` when given; ``parts``
    collects both losses of each micro-batch for the metrics. ``overlap`` (``train.moe_overlap``): the
    schedule's overlapped pairs (paired 1F1B, DualPipe-V) run with each forward interleaved with the other
    micro-batch's backward, the MoE all-to-alls of one in flight while the other computes; ``chunks`` (or
    what they wrap, ``.module``) must then be :class:`GPTChunk` s."""
    vpp = len(chunks)
    name = schedule if ps.pp.size > 1 else "1f1b"
    plan = build(name, pp=ps.pp.size, microbatches=microbatches, vpp=vpp, overlap=overlap)
    if last_stage is None:
        last_stage = next((c for c in chunks if isinstance(c, GPTChunk) and c.mtp is not None), None)

    def loss_fn(output: torch.Tensor | tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        logits, hidden = output if isinstance(output, tuple) else (output, None)
        loss = lm_loss(logits, labels, cfg=cfg, groups=groups)
        if parts is not None:
            parts.lm.append(loss.detach())
        if hidden is not None:
            if last_stage is None:
                raise TrainerError("make_executor: MTP outputs need last_stage= (this rank's last-stage GPTChunk)")
            with torch.autocast(hidden.device.type, dtype=autocast) if autocast else nullcontext():
                extra = mtp_loss(last_stage, hidden, labels)
            if parts is not None:
                parts.mtp.append(extra.detach())
            loss = loss + cfg.mtp_loss_weight * extra
        return loss if loss_scale is None else loss * loss_scale()

    if overlap:
        chunks = [_Staged(c) for c in chunks]
    return PipelineExecutor(
        plan, chunks, ps.pp, loss_fn, no_sync=no_sync, on_chunk_grads_ready=on_chunk_grads_ready, overlap=overlap
    )


class _Staged(nn.Module):
    """What the executor calls with ``overlap``: ``module`` (a data-parallel wrapper, or the chunk) for a
    whole forward, and the wrapped :class:`GPTChunk`'s ``staged_run`` for a cut one."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        chunk = module
        while not isinstance(chunk, GPTChunk) and isinstance(getattr(chunk, "module", None), nn.Module):
            chunk = chunk.module
        if not isinstance(chunk, GPTChunk):
            raise TrainerError(f"train.moe_overlap: {type(module).__name__} holds no GPTChunk to cut")
        self.staged_run = chunk.staged_run

    def forward(self, *args: Any) -> Any:
        return self.module(*args)


@dataclass
class LossParts:
    """The last stage's main (language-model) and MTP losses of a step's micro-batches, detached and
    unscaled: the metrics report the main loss as ``loss`` (comparable with runs without MTP)."""

    lm: list[torch.Tensor] = field(default_factory=list)
    mtp: list[torch.Tensor] = field(default_factory=list)

    def clear(self) -> None:
        self.lm.clear()
        self.mtp.clear()


def local_batch(ids: torch.Tensor, labels: torch.Tensor, ps: ParallelState) -> tuple[torch.Tensor, torch.Tensor]:
    """This CP rank's part of a ``[batch, seq]`` micro-batch (zigzag placement); unchanged at ``cp=1``."""
    if ps.cp.size == 1:
        return ids, labels
    return tuple(cp_ring.shard_sequence(t, group=ps.cp, dim=1) for t in (ids, labels))


def split_batch(batch: torch.Tensor, ps: ParallelState) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor]:
    """``(inputs, labels)`` of one micro-batch from the data iterator, this CP rank's part: ``inputs`` are the
    token ids, or for a packed ``[batch, 3, seq]`` micro-batch ``(ids, documents)`` (the first stage's
    arguments; see ``trainer.model.documents``)."""
    if batch.dim() == 2:
        return local_batch(batch[:, :-1], batch[:, 1:], ps)
    ids, labels = local_batch(batch[:, 0], batch[:, 1], ps)
    documents = documents_tensor(batch[:, 2])
    if ps.cp.size > 1:
        documents = cp_ring.shard_sequence(documents, group=ps.cp, dim=2)
    return (ids, documents), labels


def sync_model_parallel_grads(chunks: Sequence[GPTChunk], ps: ParallelState, *, sequence_parallel: bool) -> None:
    """Sum the gradients the split leaves partial: SP-replicated parameters over TP, tied embeddings over
    the embedding group. Call after the backwards and before the data-parallel reduction."""
    if sequence_parallel:
        for chunk in chunks:
            allreduce_sequence_parallel_grads(chunk, group=ps.tp)
    sync_tied_embedding_grads(chunks, ps)


def sync_sequence_parallel_grads(
    chunks: Sequence[GPTChunk],
    ps: ParallelState,
    grad_of: Callable[[nn.Parameter], torch.Tensor | None] = gradient,
) -> None:
    """Sum the sequence-parallel parameters' gradients over TP, once per step, in one all-reduce per
    dtype. ``grad_of``: where a parameter's gradient is (ZeRO-1/2: this rank's reduced shard of it, or
    ``None``; every TP rank lays its parameters out alike, so they own the same elements: summing over
    TP after the data-parallel reduction equals summing before it)."""
    if ps.tp.size == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for chunk in chunks:
        for p in sequence_parallel_params(chunk):
            grad = grad_of(p)
            if grad is not None and grad.numel():
                by_dtype.setdefault(grad.dtype, []).append(grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        comm.all_reduce(flat, group=ps.tp)
        for grad, piece in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(piece.view_as(grad))


def sync_tied_embedding_grads(
    chunks: Sequence[GPTChunk],
    ps: ParallelState,
    grad_of: Callable[[nn.Parameter], torch.Tensor | None] = gradient,
) -> None:
    """Sum the tied embedding copies' gradients over the ``embedding`` group (first and last stage), so
    the copies stay equal. ``grad_of``: where a copy's gradient is (ZeRO: this rank's reduced shard of
    it, or ``None`` when it owns none; the copies are laid out so both stages own the same elements).
    Where one rank holds both copies (a V layout puts the first and last stage on rank 0) they are summed
    in place and the other pipeline end holds none."""
    copies = tied_embedding_params(list(chunks))
    if len(copies) == 2:
        grads = [grad_of(p) for p in copies]
        if all(g is not None for g in grads):
            total = grads[0] + grads[1]
            for g in grads:
                g.copy_(total)
        return
    if ps.embedding is None or ps.embedding.size == 1:
        return
    for p in copies:
        if (grad := grad_of(p)) is not None:
            comm.all_reduce(grad, group=ps.embedding)


def scale_router_losses(chunks: Sequence[nn.Module], scale: float) -> None:
    """Weight the MoE routers' auxiliary losses as the executor weights each micro-batch's loss (``scale``:
    the loss scale over the micro-batches), so their gradients add up over a step as one process's do."""
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, TopKRouter):
                module.aux_loss_scale = scale

"""``ShardedOptimizer``: the distributed optimizer (ZeRO-1 and ZeRO-2) around any ``torch.optim`` optimizer.

Each rank of ``group`` owns one shard of every gradient bucket (see :mod:`dp_shard.grad_shards`). For
the parameter elements it owns it keeps master weights (float32 copies for 16-bit parameters; for
float32 parameters the master *is* that piece of the parameter, a view, so nothing is copied) and the
wrapped optimizer's state, about 1/N of each. Its gradients are reduce-scattered into the masters'
``.grad`` during backward; :meth:`step` steps the wrapped optimizer on the masters, copies 16-bit
results into the parameters and all-gathers the updated parameters. Stage 2 also keeps only its
gradient shard.

It owns the gradient reduction, so the model is *not* wrapped in ``DataParallel`` as well. The wrapped
optimizer's ``param_groups`` are this object's ``param_groups``, so LR schedulers and per-group
hyperparameters work as usual (each group holds this rank's master shards of its parameters).

Expert parameters (tagged ``expert_parallel``) are sharded over ``expert_group`` (``ps.edp``, the ranks
that hold the same experts) in a :class:`~dp_shard.grad_shards.ShardedGrads` of their own, and their
gradients are divided by the dense group's size, as ``DataParallel`` does; masters and optimizer state
follow the same sharding, and the step, ``no_sync``, the loss scaler's overflow check, clipping, the
state dict and ``memory_bytes`` cover both parts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.distributed as dist

import pstate
from pstate.tags import copy_tags, is_expert_parallel

from .checks import check_same_parameters
from .clip import clip_grad_norm_
from .errors import DataParallelError
from .grad_shards import ShardedGrads, master_dtype
from .loss_scaler import LossScaler
from .param_groups import read_param_groups
from .param_waits import GatherWaits
from .sharded_state import ParamEntry, ShardedState, probe_state_kinds

_REFUSED = {
    "LBFGS": "it evaluates the closure several times per step",
    "SparseAdam": "it needs sparse gradients, and gradients are reduced into dense buffers",
}


class ShardedOptimizer(torch.optim.Optimizer):
    """Distributed optimizer over ``group``: ``optimizer_cls(**kwargs)`` steps this rank's shard.

    ``params``: tensors, ``(name, tensor)`` pairs or param-group dicts of either (state-dict keys are
    the names, else indices). ``stage``: 1 shards master weights and optimizer state; 2 also the
    gradients. ``bucket_size_mb``, ``overlap`` and ``average`` mean what they mean for
    :class:`~dp_shard.DataParallel`. ``loss_scaler``: a :class:`~dp_shard.LossScaler` for fp16: its
    overflow check runs over ``group`` and the scaler's own groups; a step with inf/nan is skipped.
    ``collectives``: ``"reduce_scatter"`` (reduce-scatter gradients, all-gather parameters),
    ``"all_reduce"`` (all-reduce each bucket and keep the own shard, broadcast parameters: faster on
    gloo) or ``"auto"`` (``all_reduce`` on gloo, else ``reduce_scatter``). ``aligned``: parameters each
    laid out in a bucket of its own, so rank ``r`` owns the same elements of them whatever the other
    parameters are: pipeline stages that hold copies of one tensor (tied embeddings) then hold matching
    gradient shards, which :meth:`grad_shard` gives for summing between them before the step.
    ``expert_group``: the group over which parameters tagged ``expert_parallel`` are sharded and reduced
    (``ps.edp``); their gradients are averaged over the dense ``group``'s size. Tagged parameters need it.
    ``finish_in_backward``: ``True`` finishes the reduction when a synchronised backward pass ends (so the
    shards hold the gradients when ``backward()`` returns); ``False`` leaves that to
    :meth:`finish_grad_sync` (or :meth:`step`), for pipelines whose chunks end their backward at
    different times: buckets still start during backward as they fill.
    """

    def __init__(
        self,
        params: Iterable[Any],
        optimizer_cls: type[torch.optim.Optimizer],
        *,
        group: pstate.Group,
        stage: int = 1,
        bucket_size_mb: float = 25.0,
        overlap: bool = True,
        average: bool = True,
        loss_scaler: LossScaler | None = None,
        collectives: str = "auto",
        aligned: Iterable[torch.nn.Parameter] = (),
        expert_group: pstate.Group | None = None,
        finish_in_backward: bool = True,
        reduce_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        if stage not in (1, 2):
            raise DataParallelError(f"stage={stage!r}: ShardedOptimizer does stage 1 or 2 (use fully_shard for 3)")
        if not bucket_size_mb > 0:
            raise DataParallelError(f"bucket_size_mb={bucket_size_mb} must be > 0")
        if collectives not in ("auto", "reduce_scatter", "all_reduce"):
            raise DataParallelError(f"collectives={collectives!r}: expected 'auto', 'reduce_scatter' or 'all_reduce'")
        _check_optimizer(optimizer_cls, kwargs)
        if loss_scaler is not None and not isinstance(loss_scaler, LossScaler):
            raise DataParallelError(f"loss_scaler must be a dp_shard.LossScaler, got {type(loss_scaler).__name__}")
        self._groups = read_param_groups(params)
        everything = [p for g in self._groups for p in g.params]
        aligned = list(aligned)
        if any(all(p is not q for q in everything) for p in aligned):
            raise DataParallelError("every parameter in aligned= must also be one of the optimizer's parameters")
        devices = {p.device for p in everything}
        if len(devices) > 1:
            raise DataParallelError(f"parameters are on several devices {sorted(map(str, devices))}; expected one")
        named = [(str(k), p) for g in self._groups for k, p in zip(g.keys, g.params)]
        experts = [(k, p) for k, p in named if is_expert_parallel(p)]
        if experts and expert_group is None:
            raise DataParallelError(
                f"{len(experts)} parameters (e.g. {experts[0][0]!r}) are tagged expert_parallel: they need "
                "expert_group= (the expert-data-parallel group, ps.edp); reducing them over group would sum "
                "different experts"
            )
        self._device = everything[0].device
        self._kinds = probe_state_kinds(optimizer_cls, [g.options for g in self._groups], kwargs, self._device)
        self.process_group = pstate.as_group(group)
        self.expert_group = None if expert_group is None else pstate.as_group(expert_group)
        dense = [(k, p) for k, p in named if not is_expert_parallel(p)]
        if dense or self.expert_group is None:
            check_same_parameters(dense, self.process_group)
        if self.expert_group is not None and experts:
            check_same_parameters(experts, self.expert_group)
        self.stage, self.loss_scaler = stage, loss_scaler
        options = dict(
            stage=stage,
            bucket_size_mb=bucket_size_mb,
            overlap=overlap,
            average=average,
            collectives=collectives,
            finish_in_backward=finish_in_backward,
            reduce_dtype=reduce_dtype,
        )
        self.grads = ShardedGrads([p for _, p in dense], group=self.process_group, alone=aligned, **options)
        self.expert_grads = None  # expert parameters' gradients, sharded over expert_group
        if self.expert_group is not None:
            divisor = dist.get_world_size(self.process_group)  # every dense replica's tokens reach the experts
            self.expert_grads = ShardedGrads(
                [p for _, p in experts], group=self.expert_group, alone=aligned, divisor=divisor, **options
            )
        self._parts = [g for g in (self.grads, self.expert_grads) if g is not None]
        self._masters: dict[int, torch.Tensor] = {}  # id(param) -> its master shard on this rank
        self._copies: list[tuple[torch.Tensor, torch.Tensor]] = []  # (master, parameter piece) not views
        inner_groups = []
        for g in self._groups:
            inner_groups.append({"params": [m for p in g.params if (m := self._master_of(p)) is not None], **g.options})
        inner = optimizer_cls(inner_groups, **kwargs)
        super().__init__([{"params": []}], inner.defaults)  # hooks and the attributes LR schedulers read
        self.optimizer = inner
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        entries = []
        for g, kinds in zip(self._groups, self._kinds):
            for key, p in zip(g.keys, g.params):
                owned = self.grads_of(p).owned(p)
                span = (0, 0) if owned is None else (owned.start, owned.stop)
                entries.append(ParamEntry(key, p, kinds, self._masters.get(id(p)), span, self.grads_of(p).group))
        self._state = ShardedState(
            entries,
            [g.keys for g in self._groups],
            self.optimizer,
            loss_scaler=loss_scaler,
            device=self._device,
            publish=self._publish,
        )
        self._ids = {id(p) for p in everything}
        self._waits = GatherWaits(self._parts, self._slot)  # what a forward waits for (overlapped gathers)

    def grads_of(self, param: torch.nn.Parameter) -> ShardedGrads:
        """The :class:`~dp_shard.grad_shards.ShardedGrads` that shards ``param`` (dense or expert)."""
        return self.expert_grads if is_expert_parallel(param) and self.expert_grads is not None else self.grads

    def _master_of(self, param: torch.nn.Parameter) -> torch.Tensor | None:
        owned = self.grads_of(param).owned(param)
        if owned is None:
            return None
        master = owned.param
        if param.dtype != master_dtype(param.dtype):
            master = owned.param.detach().to(master_dtype(param.dtype)).clone()
            self._copies.append((master, owned.param))
        master.grad = owned.grad
        copy_tags(param, master)
        self._masters[id(param)] = master
        return master

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """For all but the last micro-batch of a step: backward accumulates locally (stage 2: in bucket
        staging buffers kept until the reduction) and the next synchronised backward (or
        :meth:`finish_grad_sync`, :meth:`step`) reduces it all, so each element is reduced once per step."""
        with ExitStack() as stack:
            for part in self._parts:
                stack.enter_context(part.no_sync())
            yield

    def finish_grad_sync(self) -> None:
        """Complete this step's reduction (a no-op when the last backward already did): afterwards
        :meth:`master_grads` hold the reduced gradient shards."""
        for part in self._parts:
            part.finish()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Step this rank's shard and all-gather the parameters. With a loss scaler: unscale, and skip
        the step (on every rank) when any gradient shard holds inf/nan. ``closure`` (evaluated once,
        with grad enabled) may run the forward and backward; its result is returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.wait_param_gather()
        for part in self._parts:
            part.finish()
        if self.loss_scaler is not None:
            groups = [part.group for part in self._parts]  # each rank holds other shards over each
            found_inf = self.loss_scaler.unscale_(self.master_grads(), groups=groups)
            self.loss_scaler.update(found_inf)
            if found_inf:
                return loss
        self.optimizer.step()
        self._publish()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradient shards (and stage 1's local buffer); they stay in place, so ``set_to_none``
        is ignored."""
        for part in self._parts:
            part.zero_grad()

    def master_params(self) -> list[torch.Tensor]:
        """This rank's master shards (``.grad``: the reduced gradient shard), in param-group order."""
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def grad_shard(self, param: torch.nn.Parameter) -> torch.Tensor | None:
        """The reduced gradient of the elements of ``param`` this rank owns (a flat view, filled once the
        backward passes are reduced), or ``None`` when it owns none of them."""
        owned = self.grads_of(param).owned(param)
        return None if owned is None else owned.grad

    def master_grads(self) -> list[torch.Tensor]:
        """The reduced gradient shards of :meth:`master_params`."""
        return [p.grad for p in self.master_params()]

    def clip_grad_norm_(
        self,
        max_norm: float,
        *,
        norm_type: float = 2.0,
        tp_group: pstate.Group | None = None,
        pp_group: pstate.Group | None = None,
        model_parallel_groups: Sequence[pstate.Group] = (),
        ep_group: pstate.Group | None = None,
        etp_group: pstate.Group | None = None,
    ) -> torch.Tensor:
        """:func:`~dp_shard.clip_grad_norm_` over the gradient shards (the data-parallel group is added to
        the dense parameters' groups, the expert group to the expert parameters': each rank holds other
        elements). With experts pass ``ep_group`` and ``etp_group`` as for the function (the expert-parallel
        groups their weights are split over). With a loss scaler the gradients are still scaled: the
        returned norm and ``max_norm`` are of the unscaled gradients."""
        scale = 1.0 if self.loss_scaler is None else self.loss_scaler.scale
        experts = [] if self.expert_group is None else [self.expert_group]
        norm = clip_grad_norm_(
            self.master_params(),
            max_norm * scale,
            norm_type=norm_type,
            tp_group=tp_group,
            pp_group=pp_group,
            model_parallel_groups=model_parallel_groups,
            ep_group=ep_group,
            etp_group=etp_group,
            dense_groups=[self.process_group],
            expert_groups=experts,
            device=self._device,
        )
        return norm / scale

    def state_dict(self) -> dict[str, Any]:
        """This rank's state in the sharded form of the docs (``pstate.Shard`` per state tensor, in the
        frame of the parameter on this rank). Collective: call it on every rank of the group (and of the
        expert group)."""
        self.wait_param_gather()
        return self._state.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load the form :meth:`state_dict` returns (its Shards filled, for example by ``ckpt`` from a
        checkpoint of another DP size): masters, states and hyperparameters; then the parameters are
        set from the masters. Everything is checked first. Collective."""
        self.wait_param_gather()
        self._state.load_state_dict(state_dict)

    def reload_model_params(self) -> None:
        """Copy the parameters into the master weights again, after loading weights into the model."""
        self.wait_param_gather()
        with torch.no_grad():
            for master, piece in self._copies:
                master.copy_(piece)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "optimizer"):
            raise DataParallelError("ShardedOptimizer cannot add param groups after construction")
        super().add_param_group(param_group)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds now: ``master`` weight copies (of 16-bit parameters; float32 masters are
        views of the parameters and cost nothing), wrapped-optimizer ``state`` tensors, and ``grad``
        storage (shard buffers, local buffers, the parameters' ``.grad``)."""
        tensors = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        state = sum(v.numel() * v.element_size() for v in tensors)
        masters = sum(m.numel() * m.element_size() for m, _ in self._copies)
        return {"master": masters, "state": state, "grad": sum(part.resident_bytes() for part in self._parts)}

    def overlap_param_gather(self, modules: Iterable[torch.nn.Module]) -> None:
        """Overlap the parameter gathers of :meth:`step` with the next forward of ``modules`` (the model
        chunks holding this optimizer's parameters). From now on :meth:`step` only starts the gathers,
        bucket by bucket in the order ``modules``' submodules register the parameters (about the order the
        forward uses them), and the forward waits for each bucket the first time it reads one of its
        parameters: on entering a module that registers it (tied aliases included), or on reading it as
        an attribute of such a module from anywhere else (see :mod:`dp_shard.param_waits`). Anything else
        that reads the parameters after a step calls :meth:`wait_param_gather` first (:meth:`step`,
        :meth:`state_dict` and :meth:`load_state_dict` do)."""
        if self._waits.active:
            raise DataParallelError("overlap_param_gather() was already called")
        order = dict.fromkeys(self._waits.watch(modules))
        for number, part in enumerate(self._parts):  # buckets no module holds directly: last
            order.update({(number, index): None for index in range(len(part.slots))})
        self._gather_order = [[i for n, i in order if n == number] for number in range(len(self._parts))]

    def full_master_params(self) -> dict[int, torch.Tensor]:
        """Each 16-bit parameter's fp32 master values, whole and shaped like it, by ``id(param)`` (copies;
        collective: one all-reduce per sharding group). For checkpoints, which save the masters under the
        parameters' names; :meth:`load_full_master_params` takes them back."""
        self.wait_param_gather()
        return self._state.full_masters()

    def load_full_master_params(self, full: Mapping[int, torch.Tensor]) -> None:
        """Set the masters of the 16-bit parameters in ``full`` (as :meth:`full_master_params` gives them)
        and the parameters from them (collective: the parameters are gathered)."""
        self.wait_param_gather()
        self._state.load_full_masters(full)

    def wait_param_gather(self) -> None:
        """Wait for every parameter gather still in flight (a no-op without :meth:`overlap_param_gather`)."""
        for part in self._parts:
            part.wait_param_gather()
        self._waits.waited_all()

    def param_gather_pending(self, param: torch.nn.Parameter) -> bool:
        """Whether ``param``'s bucket is still being gathered (read now, it would be stale)."""
        return self._waits.is_pending(param)

    def pending_param_gathers(self) -> int:
        """How many buckets' parameter gathers are in flight (not waited yet)."""
        return sum(part.pending_gathers() for part in self._parts)

    def _publish(self) -> None:
        with torch.no_grad():
            for master, piece in self._copies:
                piece.copy_(master)
        if not self._waits.active:
            for part in self._parts:
                part.all_gather_params()
            return
        for number, (part, order) in enumerate(zip(self._parts, self._gather_order)):
            part.start_param_gather(order)
            self._waits.started((number, index) for index in order)

    def _slot(self, param: torch.nn.Parameter) -> tuple[int, int] | None:
        """``param``'s (part number, bucket index), or ``None`` when this optimizer does not hold it."""
        if id(param) not in self._ids:
            return None
        part = self.grads_of(param)
        return self._parts.index(part), part.slot_index(param)


def _check_optimizer(optimizer_cls: Any, kwargs: dict[str, Any]) -> None:
    if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
        raise DataParallelError(f"optimizer_cls must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}")
    if issubclass(optimizer_cls, ShardedOptimizer):
        raise DataParallelError("optimizer_cls cannot be ShardedOptimizer itself")
    for base in optimizer_cls.__mro__:
        if base.__name__ in _REFUSED and base.__module__.startswith("torch.optim"):
            raise DataParallelError(f"{optimizer_cls.__name__} is not supported: {_REFUSED[base.__name__]}")
    if kwargs.get("differentiable"):
        raise DataParallelError(
            "differentiable=True is not supported: the step updates detached master shards, not the graph"
        )
    if "params" in kwargs:
        raise DataParallelError("pass the parameters as the first argument, not params=")

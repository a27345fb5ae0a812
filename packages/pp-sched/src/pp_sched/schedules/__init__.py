"""``build``: a named schedule for a pipeline shape, with every invalid combination refused."""

from __future__ import annotations

from ..action import Schedule
from ..errors import PipelineScheduleError
from .basic import gpipe, one_f_one_b, one_f_one_b_paired
from .interleaved import check as check_interleaved
from .interleaved import interleaved_1f1b
from .v_shape import dualpipe_v, zb_v
from .zero_bubble import zero_bubble_h1

#: The schedule names :func:`build` accepts.
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zero-bubble", "zb-v", "dualpipe-v")
#: The schedules that can pair a forward with another microbatch's backward (``build(..., overlap=True)``).
PAIRED_SCHEDULES = ("1f1b", "dualpipe-v")
#: The schedules with two chunks per rank in a V (``Schedule.layout == "v"``).
V_SCHEDULES = ("zb-v", "dualpipe-v")


def _positive(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PipelineScheduleError(f"{name}={value!r} must be an integer >= 1")
    return value


def build(
    name: str,
    *,
    pp: int,
    microbatches: int,
    vpp: int | None = None,
    num_layers: int | None = None,
    group_size: int | None = None,
    overlap: bool = False,
) -> Schedule:
    """The schedule ``name`` (one of :data:`SCHEDULES`) for ``pp`` ranks, ``microbatches`` and ``vpp`` chunks.

    ``vpp`` defaults to 1, and to 2 for the V schedules (``"zb-v"``, ``"dualpipe-v"``), which need it.

    ``num_layers``, when given, must split evenly over the ``pp * vpp`` stages (use
    :func:`pp_sched.split_layers` for uneven splits). ``group_size`` is the number of consecutive
    microbatches an interleaved rank runs per chunk (Megatron's ``microbatch_group_size_per_vp_stage``,
    default ``pp``). ``overlap=True`` asks for overlapped ``(F, B)`` pairs (``Schedule.pairs``, run
    interleaved by an executor with ``overlap=True`` to hide MoE all-to-alls): ``"1f1b"`` then warms up
    with one more forward per rank and pairs its steady state; ``"dualpipe-v"`` always has pairs.
    Raises :class:`PipelineScheduleError` naming the rule a request breaks.
    """
    if name not in SCHEDULES:
        raise PipelineScheduleError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if overlap and name not in PAIRED_SCHEDULES:
        raise PipelineScheduleError(
            f"overlap=True: schedule {name!r} has no overlapped (F, B) pairs; use one of {', '.join(PAIRED_SCHEDULES)}"
        )
    pp = _positive("pp", pp)
    microbatches = _positive("microbatches", microbatches)
    vpp = _positive("vpp", (2 if name in V_SCHEDULES else 1) if vpp is None else vpp)
    if name in V_SCHEDULES:
        if vpp != 2:
            raise PipelineScheduleError(
                f"{name!r} places two model chunks per rank in a V, so vpp must be 2, got vpp={vpp}"
            )
        if pp < 2:
            raise PipelineScheduleError(f"{name!r} needs pp >= 2 to form a V, got pp={pp}; use '1f1b'")
        if group_size is not None:
            raise PipelineScheduleError(f"group_size applies only to 'interleaved-1f1b', not {name!r}")
    elif name != "interleaved-1f1b":
        if vpp != 1:
            raise PipelineScheduleError(
                f"{name!r} runs one model chunk per rank, so vpp must be 1, got vpp={vpp}; use 'interleaved-1f1b'"
            )
        if group_size is not None:
            raise PipelineScheduleError(f"group_size applies only to 'interleaved-1f1b', not {name!r}")
    if num_layers is not None:
        num_layers = _positive("num_layers", num_layers)
        if num_layers % (pp * vpp):
            raise PipelineScheduleError(
                f"num_layers={num_layers} is not divisible by pp*vpp={pp * vpp} stages (pp={pp}, vpp={vpp}); "
                "use split_layers(..., uneven=...) for an uneven split"
            )
    if name == "zb-v":
        return Schedule(name, pp, vpp, microbatches, tuple(map(tuple, zb_v(pp, microbatches))), "v")
    if name == "dualpipe-v":
        actions, pairs = dualpipe_v(pp, microbatches)
        return Schedule(name, pp, vpp, microbatches, tuple(map(tuple, actions)), "v", tuple(map(tuple, pairs)))
    if name == "gpipe":
        actions = gpipe(pp, microbatches)
    elif name == "1f1b" and overlap:
        actions, pairs = one_f_one_b_paired(pp, microbatches)
        return Schedule(name, pp, vpp, microbatches, tuple(map(tuple, actions)), pairs=tuple(map(tuple, pairs)))
    elif name == "1f1b":
        actions = one_f_one_b(pp, microbatches)
    elif name == "zero-bubble":
        actions = zero_bubble_h1(pp, microbatches)
    else:
        group = pp if group_size is None else _positive("group_size", group_size)
        check_interleaved(pp, microbatches, vpp, group)
        actions = interleaved_1f1b(pp, microbatches, vpp, group)
    return Schedule(name, pp, vpp, microbatches, tuple(tuple(a) for a in actions))

"""Time ``layout`` and every group of a 16,384-rank grid with all axes > 1; compare megatron-core.

    python packages/pstate/benchmarks/bench_layout.py

megatron-core's RankGenerator (pure Python, a dev dependency) computes the same groups; its time is
printed beside ours when it is installed, and the groups are checked equal.
"""

from __future__ import annotations

import statistics
import time
import warnings

from pstate import ParallelConfig, layout
from pstate.layout import AXIS_GROUPS

WORLD = 16384
CONFIG = ParallelConfig(tp=8, cp=2, pp=8, vpp=4, ep=8, etp=2)


def best_of(fn, repeat=5):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times), result


def ours():
    lay = layout(CONFIG, WORLD)
    return {name: lay.groups(spec) for name, spec in AXIS_GROUPS.items()}


def megatron():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.parallel_state import RankGenerator
    c, lay = CONFIG, layout(CONFIG, WORLD)
    dec = RankGenerator(tp=c.tp, ep=1, dp=lay.dp, pp=c.pp, cp=c.cp, order=c.order)
    exp = RankGenerator(tp=c.etp, ep=c.ep, dp=lay.edp, pp=c.pp, cp=1, order=c.order)
    rename = {"etp": "tp", "edp": "dp"}
    out = {}
    for name, spec in AXIS_GROUPS.items():
        axes = spec.split("-")
        expert = any(a in ("etp", "ep", "edp") for a in axes)
        out[name] = (exp if expert else dec).get_ranks("-".join(rename.get(a, a) for a in axes))
    return out


def main() -> None:
    start = time.perf_counter()
    layout(CONFIG, WORLD)
    print(f"layout({CONFIG}, {WORLD}) first call: {1e3 * (time.perf_counter() - start):.2f} ms")
    lo, med, mine = best_of(ours)
    print(f"pstate: layout + all {len(AXIS_GROUPS)} group sets: best {1e3 * lo:.1f} ms, median {1e3 * med:.1f} ms")
    lay = layout(CONFIG, WORLD)
    lo_c, _, _ = best_of(lambda: [lay.coords(r) for r in range(WORLD)], repeat=3)
    print(f"pstate: coords of all {WORLD} ranks: best {1e3 * lo_c:.1f} ms")
    try:
        lo_m, med_m, theirs = best_of(megatron, repeat=3)
    except ImportError:
        print("megatron-core not installed: no comparison")
        return
    assert theirs == mine, "groups differ from megatron-core"
    print(f"megatron-core RankGenerator, same groups: best {1e3 * lo_m:.1f} ms, median {1e3 * med_m:.1f} ms")
    print(f"groups identical; pstate is {lo_m / lo:.1f}x faster")


if __name__ == "__main__":
    main()

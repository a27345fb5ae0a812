"""Per-rank cost of planning a save at worlds 8, 1,024 and 16,384, from simulated descriptions (no processes).

The state is a Llama-7B-shaped model (32 layers, hidden 4096, ffn 11008, vocabulary 32000) at TP8 with
ZeRO (AdamW moments as flat ranges over DP), as the trainer describes it. For one rank: the local plan
(holders from the layout, the agreement vector, ``local_plan``) against the exchange (every rank's
description gathered, ``plan`` over all of them): wall time, peak Python memory (tracemalloc) and the
bytes each rank receives. Rank 0's assembly of the index from every rank's fragment (in the commit,
in the background thread for ``AsyncSaver``) is reported separately: it is the one part that grows
with the world, on rank 0 only. Run: ``python packages/ckpt/benchmarks/bench_plan.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
import tracemalloc
from pathlib import Path

from ckpt.agree import vector
from ckpt.plan import assemble, local_plan, plan
from pstate import ParallelConfig, layout

_spec = importlib.util.spec_from_file_location("ckpt_simulated", Path(__file__).parents[1] / "tests/simulated.py")
simulated = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(simulated)

SHAPE = dict(layers=32, hidden=4096, ffn=11008, vocab=32000, zero=True)


def measure(fn, repeats: int = 3):
    """``fn()``, its best wall time of ``repeats`` untraced runs, and its peak traced memory (MiB)."""
    seconds = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds = min(seconds, time.perf_counter() - start)
    tracemalloc.start()
    out = fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, seconds, peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worlds", default="8,1024,16384")
    parser.add_argument("--exchange-up-to", type=int, default=1024, help="largest world to run the exchange at")
    args = parser.parse_args()
    print(f"{'world':>6} {'path':>9} {'rank':>6} {'seconds':>9} {'peak MiB':>9} {'received MiB':>13}")
    for world in (int(w) for w in args.worlds.split(",")):
        lay = layout(ParallelConfig(tp=8), world)
        for rank in (0, world - 1):
            doc, held = simulated.rank_doc(lay, rank, **SHAPE)

            def local(doc=doc, held=held, rank=rank):
                vector(doc, held, rank, "x" * 12 if rank == 0 else None, 0)
                return local_plan(doc, held, rank)

            _, seconds, peak = measure(local)
            print(f"{world:>6} {'local':>9} {rank:>6} {seconds:>9.4f} {peak:>9.2f} {0.0:>13.4f}")
        if world <= args.exchange_up_to:
            docs = [simulated.rank_doc(lay, r, **SHAPE)[0] for r in range(world)]
            received = sum(len(json.dumps(d)) for d in docs) / 2**20
            _, seconds, peak = measure(lambda docs=docs: plan(docs, 0), repeats=1)
            print(f"{world:>6} {'exchange':>9} {0:>6} {seconds:>9.4f} {peak:>9.2f} {received:>13.2f}")
            frags = [local_plan(d, simulated.rank_doc(lay, r, **SHAPE)[1], r).fragment for r, d in enumerate(docs)]
            _, seconds, peak = measure(lambda frags=frags: assemble(frags), repeats=1)
            sent = sum(len(json.dumps(f)) for f in frags) / 2**20
            print(f"{world:>6} {'assemble':>9} {0:>6} {seconds:>9.4f} {peak:>9.2f} {sent:>13.2f}")
        else:
            one = len(json.dumps(simulated.rank_doc(lay, 0, **SHAPE)[0]))
            print(f"{world:>6} {'exchange':>9} {0:>6} {'(skipped)':>9} {'':>9} {one * world / 2**20:>13.2f}")


if __name__ == "__main__":
    main()

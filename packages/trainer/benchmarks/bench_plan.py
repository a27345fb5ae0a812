"""Wall time of ``trainer plan``'s search at 8, 64, 1,024 and 16,384 GPUs of H100 (one process, no ranks).

    python packages/trainer/benchmarks/bench_plan.py [--model llama3-70b --seq-len 4096 --top 5 --rounds 3]

Cold: the simulator's cache emptied before the search (what one ``trainer plan`` call pays, less
Python's start and imports). Warm: the same search again in the same process. Both as CPU time of this
process (``time.process_time``: the search is single-threaded Python, so on an idle machine this is its
wall time; on a loaded one the wall time, also printed for the cold search, is longer by the waiting).
The global batch is ``max(1024, gpus)`` sequences. Prints the best of ``--rounds`` and the winner.
"""

from __future__ import annotations

import argparse
import time

from trainer.model import preset
from trainer.plan import Workload, load_hardware, search
from trainer.plan.pipeline import _simulated


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama3-70b")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--hardware", default="h100-sxm")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    hw = load_hardware(args.hardware)
    print(f"{'gpus':>6} {'cold CPU s':>10} {'warm CPU s':>10} {'cold wall s':>11}  best layout (step s, MFU)")
    for gpus in (8, 64, 1024, 16384):
        work = Workload(preset(args.model), args.seq_len, max(1024, gpus))
        cold = warm = wall = float("inf")
        for _ in range(args.rounds):
            _simulated.cache_clear()
            start, began = time.process_time(), time.perf_counter()
            found = search(work, gpus, hw, top=args.top)
            cold, wall = min(cold, time.process_time() - start), min(wall, time.perf_counter() - began)
            start = time.process_time()
            search(work, gpus, hw, top=args.top)
            warm = min(warm, time.process_time() - start)
        if found:
            L, e = found[0].layout, found[0]
            best = (f"tp {L.tp} pp {L.pp} vpp {L.vpp} cp {L.cp} ep {L.ep} dp {L.dp} zero {L.zero} mb {L.micro_batch} "
                    f"{L.recompute or 'no'} recompute {L.schedule if L.pp > 1 else ''} ({e.step_s:.2f} s, "
                    f"{100 * e.mfu:.1f}%)")  # fmt: skip
        else:
            best = "nothing fits"
        print(f"{gpus:>6} {cold:>10.3f} {warm:>10.3f} {wall:>11.3f}  {best}")


if __name__ == "__main__":
    main()

"""Unscaling (with the overflow check) and clipping of 1,000 gradients: the fused passes of
:class:`dp_shard.LossScaler` and :func:`dp_shard.clip_grad_norm_` (``torch._foreach_*`` / the AMP
multi-tensor kernel, one launch per dtype) against the same math done parameter by parameter, the way
these steps ran before they were fused (a few kernels per parameter).

One process, no collectives (the groups that would sum the norm are not part of what is timed). The two
ways are first checked to give the same bits in fp32; then each is timed, alternating, and the median
round printed.

    python packages/dp-shard/benchmarks/bench_fused_step.py --params 1000
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from dp_shard import LossScaler, clip_grad_norm_


def gradients(count: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` fp32 gradients of mixed sizes (weights, biases, norms), as a model's are."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(256, 64), (64,), (64, 256), (256,)]
    return [torch.randn(shapes[i % len(shapes)], generator=g) for i in range(count)]


def per_parameter_unscale(grads: list[torch.Tensor], scale: float) -> bool:
    """Divide each gradient by ``scale`` (as a multiply by its inverse) and report a non-finite one."""
    inverse = torch.full((1,), 1.0 / scale)
    found = False
    for grad in grads:
        found |= not bool(torch.isfinite(grad).all())
        grad.mul_(inverse)
    return found


def per_parameter_clip(grads: list[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Clip ``grads`` by their global norm, one norm and one multiply per gradient."""
    norms = torch.stack([torch.linalg.vector_norm(g, norm_type, dtype=torch.float32) for g in grads])
    if norm_type == float("inf"):
        total = torch.maximum(torch.zeros((), dtype=torch.float32), norms.max())
    else:
        total = (torch.zeros((), dtype=torch.float32) + norms.pow(norm_type).sum()) ** (1.0 / norm_type)
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    scale = torch.where(torch.isfinite(total), scale, torch.ones_like(scale))
    for grad in grads:
        grad.mul_(scale)
    return total


def holders(grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    """Parameters whose ``.grad`` are ``grads`` (what ``clip_grad_norm_`` takes)."""
    params = [torch.nn.Parameter(torch.empty_like(g)) for g in grads]
    for param, grad in zip(params, grads):
        param.grad = grad
    return params


def fused(params: list[torch.nn.Parameter], scale: float, max_norm: float) -> tuple[bool, torch.Tensor]:
    found = LossScaler(scale).unscale_(p.grad for p in params)
    return found, clip_grad_norm_(params, max_norm)


def unfused(grads: list[torch.Tensor], scale: float, max_norm: float) -> tuple[bool, torch.Tensor]:
    return per_parameter_unscale(grads, scale), per_parameter_clip(grads, max_norm)


def timed(step: Callable[[], object], iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=1000)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    a, b = gradients(args.params), gradients(args.params)
    (found_a, norm_a), (found_b, norm_b) = fused(holders(a), 2.0**16, 1.0), unfused(b, 2.0**16, 1.0)
    if found_a != found_b or not torch.equal(norm_a, norm_b) or not all(map(torch.equal, a, b)):
        raise SystemExit("the fused and per-parameter passes disagree")
    grads = gradients(args.params)
    params = holders(grads)
    steps = {"fused": lambda: fused(params, 1.0, 1e9), "per-parameter": lambda: unfused(grads, 1.0, 1e9)}
    rounds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            step()
            rounds[name].append(timed(step, args.iters))
    elements = sum(g.numel() for g in grads)
    print(f"torch {torch.__version__}, 1 thread; {args.params} fp32 gradients, {elements / 1e6:.1f}M elements")
    for name, times in rounds.items():
        print(f"{name:>14}: {statistics.median(times) * 1e3:8.2f} ms per unscale + clip")
    ratio = statistics.median(rounds["per-parameter"]) / statistics.median(rounds["fused"])
    print(f"fused is {ratio:.2f}x faster; same bits in fp32")


if __name__ == "__main__":
    main()

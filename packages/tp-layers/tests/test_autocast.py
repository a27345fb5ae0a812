"""``ColumnParallelLinear`` under autocast: the backward (which runs outside autocast) sees the dtypes
the forward computed in, and the fp32 parameters get fp32 gradients equal to ``nn.Linear``'s under the
same autocast. The output rows and the weight gradient involve no cross-rank sum, so they must match
exactly; the input gradient is summed over TP in bf16 instead of computed in one matmul (rtol 2e-2)."""

import torch
import torch.distributed as dist
from torch import nn

from tp_layers import ColumnParallelLinear


def column_under_autocast():
    rank = dist.get_rank()
    torch.manual_seed(0)
    reference = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    layer = ColumnParallelLinear(
        16, 8, group=dist.group.WORLD, full_weight=reference.weight.data, full_bias=reference.bias.data
    )
    ours_in, ref_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ref = layer(ours_in), reference(ref_in)
    ours.float().square().sum().backward()
    ref.float().chunk(2, -1)[rank].square().sum().backward()
    rows = slice(rank * 4, rank * 4 + 4)
    return ours.dtype, ours, ref[..., rows], layer.weight.grad, reference.weight.grad[rows], ours_in.grad, ref_in.grad


def test_column_parallel_linear_follows_autocast(run_ranks):
    results = run_ranks(2, column_under_autocast)
    ref_input_grad = sum(r[6] for r in results)
    for dtype, out, ref_out, grad, ref_grad, input_grad, _ in results:
        assert dtype == torch.bfloat16 and grad.dtype == torch.float32
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)
        torch.testing.assert_close(input_grad, ref_input_grad, rtol=2e-2, atol=1e-2)

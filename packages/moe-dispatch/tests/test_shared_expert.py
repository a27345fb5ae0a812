"""The shared expert: a plain MLP on one process, and TP-split inside ``MoELayer`` against one process.

- ``tp=2`` without sequence parallelism (world 2): both ranks hold the same tokens; outputs and every
  gradient equal the one-process layer's (TP weights: the slices of its gradients).
- ``tp=2`` with sequence parallelism, ``ep=2``, ``etp=2`` (world 4): TP group ``g`` holds sequence ``g``,
  each rank half of it; the router, expert and shared-expert paths all run in parallel. The reference runs
  each whole sequence on one process: a rank's output and input gradient are its half of the reference's;
  the router and gate gradients are partial sums over TP (they add up to the reference's); expert
  gradients sum over both sequences. No auxiliary losses here: with SP they are per rank's half.

Tolerance: torch's float32 defaults (rtol 1.3e-6, atol 1e-5); the parallel runs add the same terms in
another order (all-reduce / reduce-scatter of partial products).
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import pstate
from moe_dispatch import MoELayer, SharedExpert, is_expert_parallel
from tp_layers import init as tp_init
from tp_layers import is_sequence_parallel, tensor_parallel_dim

SEED, SEQ, BATCH, HIDDEN, FFN, SHARED, EXPERTS, TOPK = 3, 8, 2, 16, 8, 12, 4, 2


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_the_shared_expert_is_an_mlp_times_a_sigmoid_gate(activation):
    expert = SharedExpert(HIDDEN, SHARED, activation=activation, gate=True, seed=4)
    generator = tp_init.generator_for(4)  # full fc1, fc2 and gate, drawn in that order
    fc1 = tp_init.draw(((2 if activation == "swiglu" else 1) * SHARED, HIDDEN), tp_init.linear_init, generator)
    fc2 = tp_init.draw((HIDDEN, SHARED), tp_init.linear_init, generator)
    gate = tp_init.draw((1, HIDDEN), tp_init.linear_init, generator)
    x = torch.randn(5, 2, HIDDEN)
    h = x @ fc1.t()
    h = F.silu(h[..., :SHARED]) * h[..., SHARED:] if activation == "swiglu" else F.gelu(h)
    torch.testing.assert_close(expert(x), (h @ fc2.t()) * torch.sigmoid(x @ gate.t()))


def test_the_layer_adds_the_shared_expert_to_the_routed_experts():
    routed = MoELayer(HIDDEN, FFN, EXPERTS, TOPK, seed=SEED)
    both = MoELayer(HIDDEN, FFN, EXPERTS, TOPK, seed=SEED, shared_ffn_hidden=SHARED, shared_gate=True)
    x = torch.randn(SEQ, BATCH, HIDDEN)
    torch.testing.assert_close(both(x), routed(x) + both.shared_expert(x))
    assert not any(is_expert_parallel(p) for p in both.shared_expert.parameters())


def data(sequence):
    generator = torch.Generator().manual_seed(50 + sequence)
    return torch.randn(SEQ, BATCH, HIDDEN, generator=generator), torch.randn(SEQ, BATCH, HIDDEN, generator=generator)


def build(gate, **groups):
    return MoELayer(
        HIDDEN, FFN, EXPERTS, TOPK, seed=SEED, shared_ffn_hidden=SHARED, shared_gate=gate, **groups
    )  # fmt: skip


def grads(layer):
    shared = layer.shared_expert
    return {
        "router": layer.router.weight.grad,
        "w1": layer.experts.weight1.grad,
        "w2": layer.experts.weight2.grad,
        "fc1": shared.fc1.weight.grad,
        "fc2": shared.fc2.weight.grad,
        "gate": None if shared.gate_weight is None else shared.gate_weight.grad,
    }


def run_parallel(sequence_parallel, gate):
    state = None
    if sequence_parallel:
        state = pstate.initialize(pstate.ParallelConfig(tp=2, ep=2, etp=2))
        groups = {"ep_group": state.ep, "etp_group": state.etp, "tp_group": state.tp, "sequence_parallel": True}
        sequence, half = dist.get_rank() // 2, state.tp.rank
        assert state.tp.ranks == (2 * sequence, 2 * sequence + 1)
    else:
        groups, sequence, half = {"tp_group": dist.group.WORLD}, 0, None
    try:
        layer = build(gate, **groups)
        x, c = data(sequence)
        if half is not None:
            x, c = x.chunk(2)[half], c.chunk(2)[half]
        x.requires_grad_()
        y = layer(x)
        (y * c).sum().backward()
        tags = {
            "router_sp": is_sequence_parallel(layer.router.weight),
            "gate_sp": gate and is_sequence_parallel(layer.shared_expert.gate_weight),
            "fc_dims": (
                tensor_parallel_dim(layer.shared_expert.fc1.weight),
                tensor_parallel_dim(layer.shared_expert.fc2.weight),
            ),
        }
        first = layer.experts.first_expert
        etp_rank = state.etp.rank if state else 0
        return {"y": y.detach(), "x_grad": x.grad, **grads(layer), "first": first, "etp_rank": etp_rank, **tags}
    finally:
        if state is not None:
            state.destroy()


def reference(sequences, gate):
    out = []
    for sequence in range(sequences):
        layer = build(gate)
        x, c = data(sequence)
        x.requires_grad_()
        y = layer(x)
        (y * c).sum().backward()
        out.append({"y": y.detach(), "x_grad": x.grad, **grads(layer)})
    return out


def tp_slice(fc1, fc2, rank, tp=2):
    gate, up = fc1.chunk(2, 0)  # rank r: its slice of the gate rows, then of the up rows
    return torch.cat([gate.chunk(tp, 0)[rank], up.chunk(tp, 0)[rank]]), fc2.chunk(tp, 1)[rank]


def expert_slice(w, first, local, q, etp, dim):
    w = w[first : first + local]
    if dim == 1:
        gate, up = w.chunk(2, 1)
        return torch.cat([gate.chunk(etp, 1)[q], up.chunk(etp, 1)[q]], 1)
    return w.chunk(etp, 2)[q]


@pytest.mark.parametrize("gate", [False, True], ids=["plain", "gated"])
def test_tensor_parallel_shared_expert_equals_one_process(run_ranks, gate):
    results = run_ranks(2, run_parallel, False, gate)
    (want,) = reference(1, gate)
    for rank, got in enumerate(results):
        for key in ("y", "x_grad", "router", "w1", "w2", "gate"):
            torch.testing.assert_close(got[key], want[key])
        fc1, fc2 = tp_slice(want["fc1"], want["fc2"], rank)
        torch.testing.assert_close(got["fc1"], fc1)
        torch.testing.assert_close(got["fc2"], fc2)
        assert got["fc_dims"] == (0, 1) and not got["router_sp"] and not got["gate_sp"]


@pytest.mark.parametrize("gate", [False, True], ids=["plain", "gated"])
def test_sequence_parallel_shared_expert_with_ep_and_etp_equals_one_process(run_ranks, gate):
    results = run_ranks(4, run_parallel, True, gate)
    ref = reference(2, gate)
    w1_total, w2_total = ref[0]["w1"] + ref[1]["w1"], ref[0]["w2"] + ref[1]["w2"]
    local = EXPERTS // 2
    for rank, got in enumerate(results):
        sequence, half = divmod(rank, 2)
        want, partner = ref[sequence], results[rank ^ 1]
        torch.testing.assert_close(got["y"], want["y"].chunk(2)[half])
        torch.testing.assert_close(got["x_grad"], want["x_grad"].chunk(2)[half])
        torch.testing.assert_close(got["router"] + partner["router"], want["router"])
        if gate:
            torch.testing.assert_close(got["gate"] + partner["gate"], want["gate"])
        fc1, fc2 = tp_slice(want["fc1"], want["fc2"], half)
        torch.testing.assert_close(got["fc1"], fc1)
        torch.testing.assert_close(got["fc2"], fc2)
        first, q = got["first"], got["etp_rank"]
        torch.testing.assert_close(got["w1"], expert_slice(w1_total, first, local, q, 2, 1))
        torch.testing.assert_close(got["w2"], expert_slice(w2_total, first, local, q, 2, 2))
        assert got["router_sp"] and got["gate_sp"] == gate and got["fc_dims"] == (0, 1)


def undrawn_pieces():
    """TP2/ETP2 rank's undrawn weights: (shapes, all zero, storage bytes of the shared fc1's weight)."""
    with pstate.initialize(pstate.ParallelConfig(tp=2)) as ps:
        layer = MoELayer(
            16, 32, 4, 2, etp_group=ps.etp, shared_ffn_hidden=64, shared_gate=True, tp_group=ps.tp,
            sequence_parallel=True, seed=1, draw_experts=False,
        )  # fmt: skip
        weights = {
            "weight1": layer.experts.weight1,
            "weight2": layer.experts.weight2,
            "fc1": layer.shared_expert.fc1.weight,
            "fc2": layer.shared_expert.fc2.weight,
            "gate": layer.shared_expert.gate_weight,
        }
        shapes = {n: tuple(w.shape) for n, w in weights.items()}
        zero = all(not w.any() for w in weights.values())
        return shapes, zero, weights["fc1"].untyped_storage().nbytes()


def test_undrawn_experts_and_shared_expert_hold_only_this_ranks_zero_slices(run_ranks):
    for shapes, zero, fc1_bytes in run_ranks(2, undrawn_pieces):
        experts = {"weight1": (4, 32, 16), "weight2": (4, 16, 16)}  # ETP halves of 4 experts' [64, 16], [16, 32]
        assert shapes == {**experts, "fc1": (64, 16), "fc2": (16, 32), "gate": (1, 16)}
        assert zero
        assert fc1_bytes == 64 * 16 * 4  # this rank's slice only, not the full [128, 16] weight

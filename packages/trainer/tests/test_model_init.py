"""Sharded initialization: each rank draws only the row blocks that overlap its pieces, and every layout
holds exactly the one-process model's values (compared bit for bit, with blocks small enough that every
tensor spans several); building a model whose full tensors would not fit the bound keeps each rank's
peak resident memory within its pieces plus one block (measured with the kernel's peak RSS)."""

import pytest
import torch

SEED = 5


def pieces(parallel: dict, block_bytes: int, sp: bool = False) -> dict:
    from dataclasses import replace

    import pstate
    from trainer.model import ModelGroups, build_chunks, init, model_shards, preset

    saved, init.BLOCK_BYTES = init.BLOCK_BYTES, block_bytes
    try:
        cfg = replace(preset("tiny"), vocab_size=97, tied_embeddings=True)
        with pstate.initialize(pstate.ParallelConfig(**parallel)) as ps:
            groups = ModelGroups.from_state(ps, sequence_parallel=sp)
            chunks = build_chunks(cfg, groups, pp_rank=ps.pp.rank, pp=ps.pp.size, seed=SEED)
            return {name: (s.offsets, s.data.clone()) for name, s in model_shards(chunks).items()}
    finally:
        init.BLOCK_BYTES = saved


@pytest.mark.parametrize("parallel", [dict(tp=2), dict(pp=2), dict(tp=2, pp=2)], ids=["tp2", "pp2", "tp2-pp2"])
def test_every_layout_draws_the_one_process_values_block_by_block(run_ranks, parallel):
    from trainer.model.shards import assemble  # noqa: F401  (import check: shards is the description used)

    block = 1024  # 4 rows of 64 floats: every weight spans several blocks
    (whole,) = run_ranks(1, pieces, {}, block)
    (one_block,) = run_ranks(1, pieces, {}, 2**26)
    assert not torch.equal(whole["layers.0.attn.q.weight"][1], one_block["layers.0.attn.q.weight"][1])
    world = 2 * (2 if len(parallel) == 2 else 1)
    for rank in run_ranks(world, pieces, parallel, block):
        for name, (offsets, data) in rank.items():
            index = tuple(slice(o, o + n) for o, n in zip(offsets, data.shape))
            assert torch.equal(data, whole[name][1][index]), name


def peak_growth(block_bytes: int) -> tuple[float, float]:
    """(peak resident growth while building, bytes of this rank's parameters), in MiB, at TP2."""
    import pstate
    from trainer.model import ModelConfig, ModelGroups, build_chunks, init

    def status(field: str) -> float:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(field))
        return int(line.split()[1]) / 1024

    saved, init.BLOCK_BYTES = init.BLOCK_BYTES, block_bytes
    try:
        # embedding and head of 65536 x 1024 floats: 256 MiB each in full, 128 MiB per TP rank
        cfg = ModelConfig(hidden=1024, layers=1, heads=8, kv_heads=2, ffn_hidden=256, vocab_size=65536)
        with pstate.initialize(pstate.ParallelConfig(tp=2)) as ps:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak (VmHWM) to the current resident set
            before = status("VmRSS:")
            chunks = build_chunks(cfg, ModelGroups.from_state(ps), pp_rank=0, pp=1, seed=SEED)
            growth = status("VmHWM:") - before
            size = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters()) / 2**20
            del chunks
            return growth, size
    finally:
        init.BLOCK_BYTES = saved


def test_building_holds_only_the_pieces_and_one_block(run_ranks):
    block = 32 * 2**20
    for growth, size in run_ranks(2, peak_growth, block):
        assert size > 256  # the rank's pieces; the full embedding and head alone would be 512 MiB
        # bound: the pieces, one block, and 32 MiB for the allocator and small tensors
        assert growth <= 1.0 * size + 32 + 32, (growth, size)


MOE = dict(moe_shared_ffn_hidden=32, moe_shared_gate=True)


def moe_pieces(parallel: dict, chunk_bytes: int) -> dict:
    from dataclasses import replace

    import moe_dispatch.experts as experts
    import pstate
    from trainer.model import ModelGroups, build_chunks, model_shards, preset

    saved, experts.DRAW_CHUNK_BYTES = experts.DRAW_CHUNK_BYTES, chunk_bytes
    try:
        cfg = replace(preset("tiny-moe"), vocab_size=97, **MOE)
        with pstate.initialize(pstate.ParallelConfig(**parallel)) as ps:
            groups = ModelGroups.from_state(ps, sequence_parallel=ps.tp.size > 1)
            chunks = build_chunks(cfg, groups, pp_rank=ps.pp.rank, pp=ps.pp.size, seed=SEED)
            return {name: (s.offsets, s.data.clone()) for name, s in model_shards(chunks).items()}
    finally:
        experts.DRAW_CHUNK_BYTES = saved


@pytest.mark.parametrize(
    "parallel", [dict(ep=2), dict(tp=2), dict(tp=2, ep=2, etp=1)], ids=["ep2", "tp2-etp2", "tp2-ep2-etp1"]
)
def test_experts_and_shared_expert_streamed_in_chunks_hold_the_one_process_values(run_ranks, parallel):
    chunk = 3 * 64 * 4  # 3 rows of 64 floats: chunks straddle the gate, up and ETP halves of every expert
    (whole,) = run_ranks(1, moe_pieces, {}, chunk)
    (one_chunk,) = run_ranks(1, moe_pieces, {}, 2**26)
    for name, (_, data) in whole.items():  # streaming draws what drawing whole weights draws
        assert torch.equal(data, one_chunk[name][1]), name
    for name in ("layers.2.mlp.experts.gate", "layers.2.mlp.experts.fc2", "layers.2.mlp.shared.up.weight"):
        assert whole[name][1].abs().sum() > 0, name  # drawn, not left at zero
    world = 4 if len(parallel) == 3 else 2
    for rank in run_ranks(world, moe_pieces, parallel, chunk):
        for name, (offsets, data) in rank.items():
            index = tuple(slice(o, o + n) for o, n in zip(offsets, data.shape))
            assert torch.equal(data, whole[name][1][index]), name


def expert_draws(chunk_bytes: int) -> tuple[list, float, float, float]:
    """At EP2, with experts larger than a chunk: (the experts this rank drew, the largest chunk drawn in
    bytes, peak resident growth while building and this rank's parameter bytes, in MiB)."""
    import moe_dispatch.experts as experts
    import pstate
    from trainer.model import ModelConfig, ModelGroups, build_chunks

    def status(field: str) -> float:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(field))
        return int(line.split()[1]) / 1024

    drawn, chunks_drawn, seed_of, draw_chunk = [], [], experts.expert_seed, experts.draw_chunk

    def counting_seed(seed: int, expert: int) -> int:
        drawn.append(expert)
        return seed_of(seed, expert)

    def counting_chunk(rows: int, cols: int, bound: float, generator: torch.Generator | None) -> torch.Tensor:
        chunks_drawn.append(rows * cols * 4)
        return draw_chunk(rows, cols, bound, generator)

    saved = experts.DRAW_CHUNK_BYTES
    experts.DRAW_CHUNK_BYTES, experts.expert_seed, experts.draw_chunk = chunk_bytes, counting_seed, counting_chunk
    try:
        # 8 experts, gate/up/fc2 of 8 x 2048 x 1024 floats: 64 MiB each in full, 8 MiB per expert
        cfg = ModelConfig(
            hidden=1024, layers=1, heads=8, kv_heads=2, ffn_hidden=256, vocab_size=256, num_experts=8,
            moe_ffn_hidden=2048, moe_topk=2,
        )  # fmt: skip
        with pstate.initialize(pstate.ParallelConfig(ep=2)) as ps:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak (VmHWM) to the current resident set
            before = status("VmRSS:")
            chunks = build_chunks(cfg, ModelGroups.from_state(ps), pp_rank=0, pp=1, seed=SEED)
            growth = status("VmHWM:") - before
            size = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters()) / 2**20
            del chunks
        return drawn, max(chunks_drawn), growth, size
    finally:
        experts.DRAW_CHUNK_BYTES, experts.expert_seed, experts.draw_chunk = saved, seed_of, draw_chunk


def test_a_rank_draws_only_its_own_experts_in_bounded_chunks(run_ranks):
    chunk = 2 * 2**20  # a quarter of one expert's gate
    for rank, (drawn, largest, growth, size) in enumerate(run_ranks(2, expert_draws, chunk)):
        assert drawn == list(range(4 * rank, 4 * rank + 4))  # experts 0..3 on EP rank 0, 4..7 on rank 1
        assert largest <= chunk
        assert size > 96  # this rank's pieces: 4 of the 8 experts (96 MiB), the full expert tensors are 192
        # bound: the pieces, one chunk, and 32 MiB for the allocator and small tensors
        assert growth <= 1.0 * size + chunk / 2**20 + 32, (growth, size)


def drawn_and_undrawn() -> tuple[dict, dict]:
    from dataclasses import replace

    import pstate
    from trainer.model import ModelGroups, build_chunks, model_shards, preset

    cfg = replace(preset("tiny-moe"), vocab_size=97, **MOE)
    with pstate.initialize(pstate.ParallelConfig()) as ps:
        return tuple(
            {n: s.data.clone() for n, s in model_shards(build_chunks(
                cfg, ModelGroups.from_state(ps), pp_rank=0, pp=1, seed=SEED, draw=draw
            )).items()}
            for draw in (True, False)
        )  # fmt: skip


def test_a_model_built_to_be_loaded_draws_no_experts(run_ranks):
    ((drawn, undrawn),) = run_ranks(1, drawn_and_undrawn)
    for name in ("layers.0.mlp.experts.gate", "layers.0.mlp.experts.fc2", "layers.0.mlp.shared.gate_weight"):
        assert drawn[name].abs().sum() > 0 and not undrawn[name].any(), name
    assert torch.equal(drawn["layers.0.mlp.router.weight"], undrawn["layers.0.mlp.router.weight"])

"""The layers' own declarations of their pieces (``pieces(prefix)``) cover every element of every
parameter exactly once (the vocabulary's padding rows excepted), for every kind of layer, at TP1 and TP2."""

import pytest
import torch

CASES = {
    "dense": ("tiny", {}),
    "gpt2": ("tiny-gpt2", {}),
    "moe-shared": ("tiny-moe", {"moe_shared_ffn_hidden": 32, "moe_shared_gate": True}),
    "mla": ("tiny-mla", {}),
    "hybrid": ("tiny-hybrid", {}),
    "mtp-qk-norm": ("tiny", {"mtp_depth": 2, "tied_embeddings": True, "qk_norm": True}),
}


def coverage(name: str, overrides: dict, parallel: dict) -> dict:
    """For each parameter of this rank: (how many pieces cover each element: min, max), padding excluded."""
    from dataclasses import replace

    import pstate
    from trainer.model import ModelGroups, build_chunks, preset
    from trainer.model.shards import model_pieces

    cfg = replace(preset(name), vocab_size=97, **overrides)
    with pstate.initialize(pstate.ParallelConfig(**parallel)) as ps:
        groups = ModelGroups.from_state(ps, sequence_parallel=ps.tp.size > 1 and cfg.num_experts > 0)
        chunks = build_chunks(cfg, groups, pp_rank=ps.pp.rank, pp=ps.pp.size, seed=1, draw=False)
        counts = {id(p): torch.zeros(p.shape, dtype=torch.int32) for c in chunks for p in c.parameters()}
        names = {id(p): n for c in chunks for n, p in c.named_parameters()}
        for piece in model_pieces(chunks):
            local = piece.of(piece.param).shape  # inside the global tensor it names
            assert len(local) == len(piece.global_shape), piece.name
            assert all(o + n <= g for o, n, g in zip(piece.offsets, local, piece.global_shape)), piece.name
            piece.of(counts[id(piece.param)]).add_(1)
        out = {}
        for key, count in counts.items():
            name = names[key]
            if name in ("embedding.weight", "head.weight"):  # rows past the vocabulary are padding
                start = ps.tp.rank * count.size(0)
                count = count[: max(0, min(count.size(0), cfg.vocab_size - start))]
            out[name] = (int(count.min()), int(count.max())) if count.numel() else (1, 1)
        return out


@pytest.mark.parametrize("case", CASES)
def test_every_parameter_element_is_declared_exactly_once(run_ranks, case):
    name, overrides = CASES[case]
    for parallel, world in (({}, 1), ({"tp": 2}, 2)):
        for rank in run_ranks(world, coverage, name, overrides, parallel):
            assert rank and all(c == (1, 1) for c in rank.values()), {n: c for n, c in rank.items() if c != (1, 1)}

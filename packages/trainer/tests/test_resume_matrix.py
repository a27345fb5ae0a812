"""Resume across every pair of data-parallel modes: a run saved under each of DDP, ZeRO-1, ZeRO-2 and
ZeRO-3 loads under each of them (16 pairs at DP2), and under another layout (DP4, TP2+SP x DP2; each of
them into HSDP 2x2), and continues with the uninterrupted run's losses.

One spawn of ranks serves a whole matrix: the ranks train ``K`` steps under each saving mode and save
(the trainer's ``save_run``), then build a run of each loading mode, load (``load_run``), and train on to
``STEPS``. Two checks per pair:

- the optimizer state and the model the loading engine holds after the load equal the checkpoint's,
  exactly: the state is read back from the live engine (``run_state``: ZeRO-1/2 through its optimizer's
  state dict, DDP and ZeRO-3 from the optimizer's own tensors) and compared with the checkpoint loaded
  afresh into a copy of it (a copy loses nothing, so equality is exact);
- the losses of the resumed steps equal the uninterrupted DDP run's, rtol 2e-5 (fp32: the modes reduce
  in other orders, and each mode matches the one-process run within that in test_train_parity).

The resume line names what changed between the saved and the new run plan.
"""

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist

import ckpt
import pstate
from ckpt.tree import flatten
from trainer.config import check_run, load_run_config
from trainer.train import train_step
from trainer.train.checkpoint import load_run, run_state, save_run, saveable
from trainer.train.setup import setup

STEPS, K = 4, 2
BATCH, SEQ, VOCAB, MICRO = 8, 16, 97, 2
MODES = (0, 1, 2, 3)


def config(zero: int, parallel: dict, train: dict | None = None):
    return load_run_config(
        overrides={
            "model": {"preset": "tiny", "vocab_size": VOCAB},
            "parallel": parallel,
            "train": {
                "seq_len": SEQ,
                "micro_batch": MICRO,
                "global_batch": BATCH,
                "seed": 3,
                "zero": zero,
                "steps": STEPS,
                **(train or {}),
            },
            "optim": {"lr": 1e-2, "clip_grad": 1.0},
        }
    )


def tokens(step: int) -> np.ndarray:
    """Step ``step``'s global batch: one batch repeated, so that the loss falls fast enough to show steps."""
    return np.random.default_rng(100).integers(0, VOCAB, (BATCH, SEQ + 1))


def train_steps(run, first: int, last: int) -> list[float]:
    """Steps ``first`` to ``last`` (exclusive) on the fixed global batches; the losses."""
    losses = []
    for step in range(first, last):
        rows = np.split(tokens(step), run.ps.dp.size)[run.ps.dp.rank]
        loss, _, skipped = train_step(run, np.split(rows, run.plan.microbatches))
        assert not skipped
        losses.append(loss)
    return losses


def differences(run, path) -> list[str]:
    """The model and optimizer leaves whose live values differ from the checkpoint at ``path``."""
    live = saveable(run_state(run, K, {}))
    live = {k: live[k] for k in ("model", "optimizer")}
    fresh = copy.deepcopy(live)
    ckpt.load(fresh, path)
    want = flatten(fresh)
    return [name for name, leaf in flatten(live).items() if not torch.equal(leaf.shard().data, want[name].shard().data)]


def save_then_resume(root: str, parallel: dict, train: dict, pairs: list[tuple[int, int]], save: bool):
    """On every rank: with ``save``, the uninterrupted DDP run and a ``K``-step run per saving mode, saved
    under ``root``; then each ``(saving mode, loading mode)`` pair resumed at this layout. Returns the
    reference losses and, per pair, the resumed losses, the differing leaves and the resume line."""
    out: dict = {"pairs": {}}
    with pstate.initialize(config(0, parallel, train).parallel) as ps:

        def build(zero: int):
            cfg = config(zero, parallel, train)
            torch.manual_seed(3)
            return setup(cfg, ps, cfg.model, check_run(cfg, dist.get_world_size()))

        if save:
            out["reference"] = train_steps(build(0), 0, STEPS)
            for zero in sorted({a for a, _ in pairs}):
                run = build(zero)
                out[f"head{zero}"] = train_steps(run, 0, K)
                save_run(run, K, {"consumed": K * BATCH}, f"{root}/zero{zero}")
        for saved, zero in pairs:
            run = build(zero)
            loaded = load_run(run, f"{root}/zero{saved}", {"consumed": 0})
            assert loaded.step == K and loaded.data == {"consumed": K * BATCH}
            wrong = differences(run, f"{root}/zero{saved}")
            out["pairs"][(saved, zero)] = (train_steps(run, K, STEPS), wrong, loaded.plan_change)
    return out


@pytest.fixture(scope="module")
def saved(rank_harness, tmp_path_factory):
    """All 16 pairs at DP2 (world 2), in one spawn; the checkpoints stay for the layout changes."""
    root = str(tmp_path_factory.mktemp("resume-matrix"))
    pairs = [(a, b) for a in MODES for b in MODES]
    results = rank_harness.run(2, save_then_resume, root, {"dp": 2}, {}, pairs, True)
    return root, results


def check(results, reference, pairs):
    for rank, result in enumerate(results):
        for pair in pairs:
            losses, wrong, _ = result["pairs"][pair]
            assert not wrong, f"rank {rank}, zero {pair[0]} -> zero {pair[1]}: {wrong[:4]} differ from the checkpoint"
            assert losses == pytest.approx(reference[K:], rel=2e-5), f"rank {rank}, zero {pair[0]} -> zero {pair[1]}"


def test_every_pair_of_modes_resumes_with_the_uninterrupted_losses(saved):
    root, results = saved
    reference = results[0]["reference"]
    assert reference[-1] < reference[0]
    for zero in MODES:  # each saving run is the uninterrupted one up to K
        assert results[0][f"head{zero}"] == pytest.approx(reference[:K], rel=2e-5)
    check(results, reference, [(a, b) for a in MODES for b in MODES])
    lines = {pair: line for pair, (_, _, line) in results[0]["pairs"].items()}
    assert lines[(1, 1)] == "the run plan is the saved one"
    assert lines[(0, 3)] == "layout changed (zero 0->3)"
    values = ckpt.inspect(f"{root}/zero2")["values"]  # the plan, as saved (what ckpt inspect shows)
    assert (values["plan/zero"], values["plan/global_batch"], values["plan/microbatches"]) == (2, BATCH, 2)


LAYOUTS = {
    "dp4": ({"dp": 4}, {}, [(0, 1), (1, 2), (2, 3), (3, 0)]),
    "tp2-sp-dp2": ({"tp": 2}, {"sequence_parallel": True}, [(0, 3), (1, 0), (2, 1), (3, 2)]),
    # HSDP 2x2 (ZeRO-3 sharded within pairs of ranks, replicated across them) from every mode
    "hsdp-2x2": ({"dp": 4, "dp_shard": 2}, {}, [(0, 3), (1, 3), (2, 3), (3, 3)]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_layout_change_resumes_every_mode(saved, rank_harness, layout):
    root, first = saved
    parallel, train, pairs = LAYOUTS[layout]
    results = rank_harness.run(4, save_then_resume, root, parallel, train, pairs, False)
    check(results, first[0]["reference"], pairs)
    line = results[0]["pairs"][pairs[0]][2]
    assert line.startswith("layout changed (") and "training changed" not in line
    if layout == "dp4":
        assert "dp 2->4" in line and "microbatches 2->1" in line


def test_a_changed_global_batch_is_reported(saved, rank_harness):
    root, _ = saved
    results = rank_harness.run(2, save_then_resume, root, {"dp": 2}, {"global_batch": 16}, [(1, 2)], False)
    line = results[0]["pairs"][(1, 2)][2]
    assert line == "layout changed (microbatches 2->4, zero 1->2); training changed (global_batch 8->16)"

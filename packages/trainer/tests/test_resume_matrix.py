"""Resume across every pair of data-parallel modes: a run saved under each of DDP, ZeRO-1, ZeRO-2 and
ZeRO-3 loads under each of them (16 pairs at DP2), and under another layout (DP4, TP2+SP x DP2; each of
them into HSDP 2x2, and HSDP 2x2 into ZeRO-1 and ZeRO-2 at DP4), and continues with the uninterrupted
run's losses.

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
from contextlib import ExitStack

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
HSDP = "hsdp"  # ZeRO-3 sharded within pairs of data-parallel ranks, replicated across the pairs (dp_shard 2)


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


def mode_config(mode, parallel: dict, train: dict | None = None):
    """The run of ``mode``: ``train.zero`` at ``parallel``, or :data:`HSDP` (ZeRO-3 with ``dp_shard`` 2)."""
    if mode == HSDP:
        return config(3, {**parallel, "dp_shard": 2}, train)
    return config(mode, parallel, train)


def folder(root: str, mode) -> str:
    return f"{root}/{mode}" if mode == HSDP else f"{root}/zero{mode}"


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


def save_then_resume(root: str, parallel: dict, train: dict, pairs: list[tuple], saves: list, reference: bool):
    """On every rank: with ``reference``, the uninterrupted DDP run; a ``K``-step run of each mode in ``saves``,
    saved under ``root``; then each ``(saving mode, loading mode)`` pair resumed at this layout (a mode:
    ``train.zero`` or :data:`HSDP`). Returns the reference losses and, per pair, the resumed losses, the
    differing leaves and the resume line."""
    out: dict = {"pairs": {}}
    with ExitStack() as stack:
        states: dict = {}  # the process groups of each parallel config (HSDP's has its shard groups)

        def build(mode):
            cfg = mode_config(mode, parallel, train)
            if cfg.parallel not in states:
                states[cfg.parallel] = stack.enter_context(pstate.initialize(cfg.parallel))
            torch.manual_seed(3)
            return setup(cfg, states[cfg.parallel], cfg.model, check_run(cfg, dist.get_world_size()))

        if reference:
            out["reference"] = train_steps(build(0), 0, STEPS)
        for mode in saves:
            run = build(mode)
            out[f"head{mode}"] = train_steps(run, 0, K)
            save_run(run, K, {"consumed": K * BATCH}, folder(root, mode))
        for saved, mode in pairs:
            run = build(mode)
            loaded = load_run(run, folder(root, saved), {"consumed": 0})
            assert loaded.step == K and loaded.data == {"consumed": K * BATCH}
            wrong = differences(run, folder(root, saved))
            out["pairs"][(saved, mode)] = (train_steps(run, K, STEPS), wrong, loaded.plan_change)
    return out


@pytest.fixture(scope="module")
def saved(rank_harness, tmp_path_factory):
    """All 16 pairs at DP2 (world 2), in one spawn; the checkpoints stay for the layout changes."""
    root = str(tmp_path_factory.mktemp("resume-matrix"))
    pairs = [(a, b) for a in MODES for b in MODES]
    results = rank_harness.run(2, save_then_resume, root, {"dp": 2}, {}, pairs, list(MODES), True)
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
    "dp4": ({"dp": 4}, {}, [(0, 1), (1, 2), (2, 3), (3, 0)], []),
    "tp2-sp-dp2": ({"tp": 2}, {"sequence_parallel": True}, [(0, 3), (1, 0), (2, 1), (3, 2)], []),
    # HSDP 2x2 from every mode at DP2; then HSDP 2x2, saved here, into ZeRO-1 and ZeRO-2 at DP4 (shards of
    # pairs of ranks resharded over all four)
    "hsdp-2x2": ({"dp": 4}, {}, [*((zero, HSDP) for zero in MODES), (HSDP, 1), (HSDP, 2)], [HSDP]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_layout_change_resumes_every_mode(saved, rank_harness, layout):
    root, first = saved
    parallel, train, pairs, saves = LAYOUTS[layout]
    reference = first[0]["reference"]
    results = rank_harness.run(4, save_then_resume, root, parallel, train, pairs, saves, False)
    for mode in saves:  # a saving run here is the uninterrupted one up to K
        assert results[0][f"head{mode}"] == pytest.approx(reference[:K], rel=2e-5)
    check(results, reference, pairs)
    line = results[0]["pairs"][pairs[0]][2]
    assert line.startswith("layout changed (") and "training changed" not in line
    if layout == "dp4":
        assert "dp 2->4" in line and "microbatches 2->1" in line
    if layout == "hsdp-2x2":
        assert line == "layout changed (world_size 2->4, dp 2->4, edp 2->4, microbatches 2->1, zero 0->3)"
        assert results[0]["pairs"][(HSDP, 1)][2] == "layout changed (dp_shard 2->4, zero 3->1)"
        summary = ckpt.inspect(folder(root, HSDP))  # what ckpt inspect shows: the layout record and the plan
        layout, values = summary["layout"], summary["values"]
        assert (layout["dp_shard"], layout["cp_a2a"], values["plan/dp_shard"], values["plan/zero"]) == (2, 1, 2, 3)


def test_a_changed_global_batch_is_reported(saved, rank_harness):
    root, _ = saved
    results = rank_harness.run(2, save_then_resume, root, {"dp": 2}, {"global_batch": 16}, [(1, 2)], [], False)
    line = results[0]["pairs"][(1, 2)][2]
    assert line == "layout changed (microbatches 2->4, zero 1->2); training changed (global_batch 8->16)"


def uneven_stages(root: str) -> list[str]:
    """PP2 with layers 3+1 saved after ``K`` steps, then resumed at 3+1 and at even stages: the resume lines."""
    lines = []
    for number, stages in enumerate(([3, 1], [3, 1], None)):
        cfg = config(0, {"pp": 2, "pipeline_layout": stages})
        with pstate.initialize(cfg.parallel) as ps:
            torch.manual_seed(3)
            run = setup(cfg, ps, cfg.model, check_run(cfg, dist.get_world_size()))
            if number == 0:
                train_steps(run, 0, K)
                save_run(run, K, {"consumed": K * BATCH}, f"{root}/uneven")
            else:
                lines.append(load_run(run, f"{root}/uneven", {"consumed": 0}).plan_change)
    return lines


def test_layers_per_stage_are_saved_and_compared_on_resume(rank_harness, tmp_path):
    lines = rank_harness.run(2, uneven_stages, str(tmp_path))[0]
    assert lines == ["the run plan is the saved one", "layout changed (pipeline_layout (3, 1)->None)"]

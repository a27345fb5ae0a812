"""``trainer train --dry-run``: rank R of an N-rank job built in this process with the fake backend.

Against real world-8 gloo runs of the same model and layout (one training step on the same made-up
tokens, recorded by ``pstate.comm``): the dry run's parameter, gradient, optimizer and buffer bytes and
checkpoint share equal the real rank's, whether the model is built at real size or on the meta device;
the simulated step's collectives per axis (calls and payload bytes of every operation) equal the real
step's. At world 16,384 (a 4D+EP layout, meta device; groups only this rank's) ranks 0, 8191 and 16383
give the figures of the world-8 rank with the same TP/CP/PP/EP coordinates (DDP: nothing shards over DP),
and at real size their simulated steps issue the twin's TP and PP collectives call for call.
"""

import json

import pytest
import torch

import pstate
import trainer.train.dry_run as dry_module
from pstate.comm import CommRecorder
from trainer.config import check_run, load_run_config
from trainer.train.dry_run import comm_axes, dry_run, made_up_batches, rank_figures
from trainer.train.loop import train_step
from trainer.train.setup import setup

EP_OVER_DP = {  # EP pairs ranks that differ only in their DP coordinate: they route the same tokens
    "model": {"preset": "tiny-moe", "vocab_size": 256},
    "parallel": {"pp": 2, "ep": 2},
    "train": {"seq_len": 32, "micro_batch": 1, "global_batch": 8, "zero": 1},
}
MOE = {
    "model": {"preset": "tiny-moe", "vocab_size": 256},
    "parallel": {"tp": 2, "cp": 2, "pp": 2, "ep": 2},
    "train": {"sequence_parallel": True, "seq_len": 32, "micro_batch": 1, "zero": 0},
}
AXES = ("tp", "cp", "pp", "ep", "etp")


def fixed_routing(run):
    """Zero router weights: every token picks the same experts whatever its values. A simulated step's
    values are not the real ones (receives hold zeros), so this makes routing, and with it the MoE
    all-to-all sizes, the same in both."""
    with torch.no_grad():
        for chunk in run.chunks:
            for name, p in chunk.named_parameters():
                if ".router." in f".{name}":
                    p.zero_()
    return run


@pytest.fixture(autouse=True)
def _fixed_routing_in_dry_runs(monkeypatch):
    monkeypatch.setattr(dry_module, "setup", lambda *a, **k: fixed_routing(setup(*a, **k)))


def real_step(overrides: dict) -> dict:
    """One real step on this rank of a gloo run: its recorded collectives and its figures afterwards."""
    import torch.distributed as dist

    cfg = load_run_config(overrides=overrides)
    plan = check_run(cfg, dist.get_world_size())
    torch.manual_seed(cfg.train.seed)
    with pstate.initialize(cfg.parallel) as ps:
        run = fixed_routing(setup(cfg, ps, cfg.model, plan))
        recorder = CommRecorder.for_state(ps)
        with recorder:
            train_step(run, made_up_batches(run))
        return {"coords": ps.layout.coords(ps.rank), "comm": comm_axes(recorder), **rank_figures(run, ps.rank)}


@pytest.fixture(scope="module")
def ep_over_dp(rank_harness):
    return rank_harness.run(8, real_step, EP_OVER_DP)


@pytest.fixture(scope="module")
def moe(rank_harness):
    return rank_harness.run(8, real_step, MOE)


@pytest.mark.parametrize("device", ["real", "meta"])
def test_dry_runs_at_world_8_equal_the_real_run(ep_over_dp, device):
    """Simulated all-gathers make every rank of a group route like this one: exact where it does (here
    the EP ranks hold the same tokens), so the MoE all-to-alls match byte for byte too."""
    cfg = load_run_config(overrides=EP_OVER_DP)
    dense = ep_over_dp
    for rank in (0, 5, 7):
        dry = dry_run(cfg, 8, rank, device=device)
        assert dry["device"] == device
        assert dry["bytes"] == dense[rank]["bytes"]
        assert dry["checkpoint"] == dense[rank]["checkpoint"]
        if device == "real":  # the simulated step issues what the real one did, call for call
            sim, real = dry["comm"]["axes"], dense[rank]["comm"]
            assert {a: v["bytes"] for a, v in sim.items()} == {a: v["bytes"] for a, v in real.items()}
            # ZeRO-1's groups: reduce-scatter + all-gather here, but all-reduce + broadcast of the same
            # payload on gloo, which has no reduce-scatter (dp_shard.grad_shards); every other axis call for call
            zero = {a for a, v in sim.items() if "reduce_scatter" in v["ops"] and a not in ("tp",)}
            assert zero and {a: v for a, v in sim.items() if a not in zero} == {
                a: v for a, v in real.items() if a not in zero
            }
        else:
            assert "axes" not in dry["comm"] and dry["comm"]["source"].startswith("analytic")


def test_4d_moe_dry_run_at_world_8_equals_the_real_run(moe):
    cfg = load_run_config(overrides=MOE)
    for rank in (0, 6):
        dry = dry_run(cfg, 8, rank, device="real")
        assert dry["bytes"] == moe[rank]["bytes"]
        assert dry["checkpoint"] == moe[rank]["checkpoint"]
        assert dry["comm"]["axes"] == moe[rank]["comm"]


def test_dry_runs_at_world_16384_equal_the_real_run_where_the_layouts_coincide(moe):
    cfg = load_run_config(overrides=MOE)
    for rank in (0, 8191, 16383):
        dry = dry_run(cfg, 16384, rank, device="meta")
        (twin,) = [r for r in moe if all(r["coords"][a] == dry["coords"][a] for a in AXES)]
        assert dry["bytes"] == twin["bytes"]
        assert dry["checkpoint"]["leaves"] == twin["checkpoint"]["leaves"]
        assert set(dry["seconds"]) == {"config", "process_group", "groups", "model_and_engine", "checkpoint_plan"}
        # at real size the same ranks run a simulated step: TP and PP (groups alike at both worlds) call
        # for call as the twin's recorded step
        stepped = dry_run(cfg, 16384, rank, device="real")
        for axis in ("tp", "pp"):
            assert stepped["comm"]["axes"][axis] == twin["comm"][axis]


@pytest.mark.parametrize(
    ("parallel", "train"),
    [
        ({"tp": 2, "pp": 2}, {"zero": 3}),
        ({"tp": 2, "pp": 2}, {"zero": 2, "sequence_parallel": True}),
        ({"pp": 2, "vpp": 2}, {"pipeline_schedule": "zb-v", "global_batch": 16}),
        ({"cp": 2}, {"zero": 3, "cp_attention": "ulysses"}),
    ],
)
def test_meta_builds_give_the_bytes_of_a_real_size_run_after_its_step(parallel, train):
    """Every engine and schedule: a meta model with its first step's state (optimizer, ZeRO-3 grads) holds
    the bytes a real-size model holds after a simulated step (rank 5 of 16)."""
    cfg = load_run_config(
        overrides={"model": {"preset": "tiny", "vocab_size": 256}, "parallel": parallel,
                   "train": {"seq_len": 32, "micro_batch": 1, **train}}
    )  # fmt: skip
    real, meta = dry_run(cfg, 16, 5, device="real"), dry_run(cfg, 16, 5, device="meta")
    assert real["device"] == "real" and meta["device"] == "meta"
    assert meta["bytes"] == real["bytes"] and meta["checkpoint"] == real["checkpoint"]
    assert real["bytes"]["optimizer"] > 0 and real["comm"]["axes"]


def test_cli_dry_run_on_the_meta_device(capsys):
    from trainer.cli import main

    flags = ["--model", "tiny-moe", "--set", "model.vocab_size=256", "--tp", "2", "--cp", "2", "--pp", "2", "--ep", "2"]
    flags += ["--sequence-parallel", "--seq-len", "32", "--dry-run", "--world-size", "16384"]
    assert main(["train", *flags, "--rank", "16383", "--dry-run-device", "meta"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device"] == "meta" and report["coords"]["pp"] == 1 and report["bytes"]["parameters"] > 0
    assert report["comm"]["source"].startswith("analytic") and report["comm"]["wire_bytes"]["dp"] > 0
    assert main(["train", *flags, "--rank", "16384"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rank=16384" in err[0]

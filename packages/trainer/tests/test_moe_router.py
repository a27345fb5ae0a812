"""The MoE router options of ``ModelConfig`` in training, against the one-process run.

Aux-loss-free balancing: after each step every rank moves each router's expert bias by the tokens each
expert received in the step, counted once per micro-batch (not again in a recomputed forward) and
summed over the ranks that routed other tokens (DP with EP inside it, CP, TP under SP). The step's
loads (tokens per expert) must equal the one-process run's exactly (integers), so must the biases
(the same sequence of +-rate steps), and the losses to rtol 2e-5 (fp32; see test_train_parity.py).
A second router (sigmoid scores, group-limited top-k, z-loss, routed scaling, expert bias) runs at
EP2 x TP2 with sequence parallelism, a pipeline whose second stage has no MoE layer at PP2 x EP2, and a
capacity factor (dropping tokens, padding every expert to its capacity) at EP2 x DP4.
"""

from unittest import mock

import pytest

import pstate
import trainer.train.loop as loop
from trainer.config import load_run_config
from trainer.errors import TrainerError
from trainer.hf.config import family
from trainer.infer.load import load_chunk
from trainer.model import ModelConfig, preset
from trainer.model.shards import expert_bias_shards
from trainer.train.expert_bias import ExpertBiasUpdater
from trainer.train.loop import train

STEPS = 6
BIAS = {"preset": "tiny-moe", "moe_expert_bias": True, "moe_expert_bias_rate": 0.05}
DEEPSEEK = {
    **BIAS,
    "moe_score": "sigmoid",
    "moe_num_groups": 2,
    "moe_topk_groups": 1,
    "moe_z_loss_coeff": 1e-3,
    "moe_routed_scaling": 2.0,
}


def run_training(overrides: dict, tmp: str) -> dict:
    """This rank's losses, each step's loads of its biased routers, and their final biases by name."""
    base = {
        "model": {"preset": "tiny-moe"},
        "train": {"steps": STEPS, "seq_len": 32, "micro_batch": 2, "global_batch": 8, "seed": 5},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "clip_grad": 1.0},
        "data": {"cache_dir": tmp},
    }
    for section, values in overrides.items():
        base.setdefault(section, {}).update(values)
    runs, loads = [], []
    setup, measure = loop.setup, ExpertBiasUpdater.loads

    def spy_setup(*args, **kwargs):
        runs.append(setup(*args, **kwargs))
        return runs[-1]

    def spy_loads(self):
        out = measure(self)
        loads.append([x.tolist() for x in out])
        return out

    with mock.patch.object(loop, "setup", spy_setup), mock.patch.object(ExpertBiasUpdater, "loads", spy_loads):
        losses = [r["loss"] for r in train(load_run_config(overrides=base))]
    biases = {name: s.data.tolist() for name, s in expert_bias_shards(runs[0].chunks).items()}
    return {"losses": losses, "loads": loads, "biases": biases}


def check_against(reference: dict, result: dict) -> None:
    """``result`` (one rank's) has the reference's losses, and its routers' loads and biases."""
    assert result["losses"] == pytest.approx(reference["losses"], rel=2e-5)
    names = sorted(reference["biases"])
    assert set(result["biases"]) <= set(names)
    columns = [names.index(n) for n in sorted(result["biases"])]  # this stage's routers, in layer order
    expected = [[step[i] for i in columns] for step in reference["loads"]] if columns else []  # [] without routers
    assert result["loads"] == expected
    for name, bias in result["biases"].items():
        assert bias == reference["biases"][name]


LAYOUTS = {
    "ep2-dp4": (4, {"model": BIAS, "parallel": {"ep": 2}}),
    "ep2-cp2-recompute": (4, {"model": BIAS, "parallel": {"cp": 2, "ep": 2}, "train": {"recompute": "full"}}),
    "deepseek-ep2-tp2-sp": (
        4,
        {"model": DEEPSEEK, "parallel": {"tp": 2, "ep": 2}, "train": {"sequence_parallel": True}},
    ),
    # capacity is per rank's micro-batch: at EP x DP each rank routes a one-process micro-batch
    "capacity-ep2-dp4": (
        4,
        {
            "model": {**BIAS, "moe_capacity_factor": 1.0, "moe_drop_policy": "position", "moe_pad_to_capacity": True},
            "parallel": {"ep": 2},
        },
    ),
    # layer 0 only is MoE: the second stage has no router and takes no part
    "pp2-ep2-one-moe-stage": (4, {"model": {**BIAS, "moe_every": 4}, "parallel": {"pp": 2, "ep": 2}}),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_expert_bias_and_router_options_equal_the_one_process_run(run_ranks, tmp_path, layout):
    world, overrides = LAYOUTS[layout]
    reference = run_ranks(1, run_training, {"model": overrides["model"]}, str(tmp_path))[0]
    tokens = 8 * 32 * 2  # global batch * seq_len * topk: every routing slot is counted once per step
    counted = [sum(load) for step in reference["loads"] for load in step]
    if overrides["model"].get("moe_capacity_factor") is None:
        assert counted == [tokens] * len(counted)
    else:  # the dropped tokens are not counted
        assert max(counted) <= tokens and min(counted) < tokens
    assert all(any(b != 0 for b in bias) for bias in reference["biases"].values())
    for result in run_ranks(world, run_training, overrides, str(tmp_path)):
        check_against(reference, result)


def test_the_expert_bias_changes_the_routing(run_ranks, tmp_path):
    """Without the bias (or with a rate too small to reorder the scores) the losses differ."""
    biased = run_ranks(1, run_training, {"model": BIAS}, str(tmp_path))[0]
    plain = run_ranks(1, run_training, {"model": {**BIAS, "moe_expert_bias": False}}, str(tmp_path))[0]
    assert biased["losses"][0] == plain["losses"][0]
    assert biased["losses"][-1] != pytest.approx(plain["losses"][-1], rel=1e-4)
    assert plain["loads"] == [] and plain["biases"] == {}


def inference_biases(save: str) -> dict:
    with pstate.initialize(pstate.ParallelConfig()) as ps:
        chunk, _, _ = load_chunk(save, ps)
    return {name: s.data.tolist() for name, s in expert_bias_shards([chunk]).items()}


def test_the_expert_bias_survives_a_resume_at_another_layout(run_ranks, tmp_path):
    """Stopped after step 3 at EP2 x DP2, resumed at TP2 with SP: the same loads, biases and losses."""
    cache, save = str(tmp_path / "cache"), str(tmp_path / "ckpt")
    full = run_ranks(1, run_training, {"model": BIAS}, cache)[0]
    first = {"model": BIAS, "parallel": {"ep": 2}, "train": {"save": save, "exit_interval": 3}}
    second = {"model": BIAS, "parallel": {"tp": 2}, "train": {"sequence_parallel": True, "load": save}}
    head = run_ranks(2, run_training, first, cache)[0]
    served = run_ranks(1, inference_biases, save)[0]
    tail = run_ranks(2, run_training, second, cache)[0]
    assert served == head["biases"]  # inference loads them too
    assert head["biases"] != full["biases"]  # the bias moved after the save: a fresh one would be wrong
    assert head["losses"] + tail["losses"] == pytest.approx(full["losses"], rel=2e-5)
    assert head["loads"] + tail["loads"] == full["loads"]
    assert tail["biases"] == full["biases"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"moe_num_groups": 3}, "model.moe_num_groups=3: must divide num_experts=4"),
        ({"moe_num_groups": 2, "moe_topk_groups": 3}, r"model.moe_topk_groups=3: must be an integer in \[1, moe_num"),
        (
            {"moe_num_groups": 4, "moe_topk_groups": 1},
            r"model.moe_topk=2: must be <= moe_topk_groups \* experts per group = 1\*1 = 1",
        ),
        ({"moe_score": "tanh"}, "model.moe_score='tanh': must be one of"),
        ({"moe_drop_policy": "random"}, "model.moe_drop_policy='random': must be one of"),
        ({"moe_z_loss_coeff": -1.0}, "model.moe_z_loss_coeff=-1.0: must be a finite number >= 0"),
        ({"moe_expert_bias_rate": 0.0}, "model.moe_expert_bias_rate=0.0: must be a finite number > 0"),
        ({"moe_capacity_factor": 0}, "model.moe_capacity_factor=0: must be a finite number > 0"),
        ({"moe_routed_scaling": float("nan")}, "model.moe_routed_scaling=nan: must be a finite number > 0"),
        ({"moe_score": "sigmoid", "moe_norm_topk": False}, "model.moe_norm_topk=False: not supported with moe_"),
        ({"moe_pad_to_capacity": True}, "model.moe_pad_to_capacity=True: needs model.moe_capacity_factor"),
        ({"moe_first_dense": 2}, "model.moe_first_dense=2: leaves no MoE layer among layers=2 with moe_every=1"),
        ({"moe_first_dense": -1}, "model.moe_first_dense=-1: must be an integer >= 0"),
        ({"num_experts": 0, "moe_first_dense": 1}, r"model.moe_first_dense=1: needs experts \(model.num_experts > 0\)"),
    ],
)
def test_router_fields_are_checked_by_name(changes, message):
    base = ModelConfig(hidden=32, layers=2, heads=2, num_experts=4)
    with pytest.raises(TrainerError, match=message):
        base.with_overrides(**changes)


def test_router_options_mixtral_and_qwen_moe_lack_are_refused_on_export():
    plain = preset("tiny-moe").with_overrides(moe_every=1, vocab_size=64)
    assert family(plain) == "mixtral"
    for changes in ({"moe_score": "sigmoid"}, {"moe_num_groups": 2}, {"moe_expert_bias": True}):
        name, value = next(iter(changes.items()))
        with pytest.raises(TrainerError, match=f"model.{name}={value!r}: Mixtral and Qwen-MoE route without it"):
            family(plain.with_overrides(**changes))

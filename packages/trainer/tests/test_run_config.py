"""Run configuration: TOML and overrides onto the typed sections, and the rules refused before launch."""

import dataclasses
import json
import math

import pytest
import tomllib
import torch
from torch.utils.flop_counter import FlopCounterMode

import pstate
from trainer.config import OptimConfig, RunPlan, check_run, load_run_config, to_toml
from trainer.errors import TrainerError
from trainer.model import ModelGroups, build_chunks, preset
from trainer.train.flops import flops_per_token
from trainer.train.lr import lr_at


def test_toml_file_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\npreset = "tiny-gpt2"\nlayers = 8\n[parallel]\ntp = 2\n[train]\nsteps = 7\n')
    cfg = load_run_config(path, {"train": {"seed": 3}, "parallel": {"pp": 2}})
    assert (cfg.model.layers, cfg.model.norm, cfg.parallel.tp, cfg.parallel.pp) == (8, "layernorm", 2, 2)
    assert (cfg.train.steps, cfg.train.seed) == (7, 3)


@pytest.mark.parametrize("model", ["tiny", "tiny-gpt2", "tiny-moe", "llama3-8b"])
def test_printed_config_loads_back_to_the_same_run(tmp_path, model):
    cfg = load_run_config(
        overrides={"model": {"preset": model}, "parallel": {"tp": 2}, "train": {"sequence_parallel": True}}
    )
    path = tmp_path / "again.toml"
    path.write_text(to_toml(cfg))
    assert load_run_config(path) == cfg
    assert tomllib.loads(to_toml(cfg))["train"]["sequence_parallel"] is True


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"bogus": {}}, "unknown section"),
        ({"model": {"preset": "tiny-hybrid", "attention": "mla", "kv_heads": 4}}, "take standard attention"),
        ({"train": {"stepz": 3}}, r"unknown field\(s\) \['stepz'\]"),
        ({"model": {"hidden_size": 3}}, "model.hidden_size: no such field"),
        ({"model": {"preset": "nope"}}, "unknown; choose one of"),
        ({"train": {"precision": "fp4"}}, "train.precision='fp4'"),
        ({"parallel": {"tp": 0}}, "tp=0 must be >= 1"),
        ({"optim": {"min_lr": 1.0}}, r"optim.lr=0.0003: must be >= optim.min_lr=1.0"),
        ({"optim": {"lr": float("inf")}}, "optim.lr=inf: must be a finite number > 0"),
        ({"train": {"steps": 2.5}}, "train.steps=2.5: must be an integer"),
        ({"train": {"steps": True}}, "train.steps=True: must be an integer"),
        ({"train": {"global_batch": 0}}, "train.global_batch=0: must be >= 1"),
        ({"train": {"seed": -1}}, "train.seed=-1: must be >= 0"),
        ({"train": {"cp_attention": "x"}}, "train.cp_attention=.x.: must be one of"),
        ({"parallel": {"cp": 4, "cp_a2a": 3}}, "cp_a2a=3 must divide cp=4"),
        ({"train": {"cp_kernel": "flash"}}, r"train.cp_kernel='flash': must be one of \('auto', 'sdpa', 'math'\)"),
        ({"model": {"attention": "x"}}, "model.attention='x': must be one of"),
        ({"model": {"preset": "tiny-mla", "kv_heads": 2}}, r"model.kv_heads=2: MLA up-projects keys/values for every"),
        (
            {"model": {"preset": "tiny-mla", "qk_rope_head_dim": 7}},
            "model.qk_rope_head_dim=7: must be even",
        ),
        ({"model": {"preset": "tiny-mla", "kv_lora_rank": 0}}, "model.kv_lora_rank=0: must be a positive integer"),
        ({"optim": {"beta1": 1.5}}, "optim.beta1=1.5: must be a finite number >= 0 and < 1"),
    ],
)
def test_bad_fields_are_named(overrides, match):
    with pytest.raises(TrainerError, match=match):
        load_run_config(overrides=overrides)


def test_missing_and_invalid_files_are_named(tmp_path):
    with pytest.raises(TrainerError, match="not found"):
        load_run_config(tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("[train\n")
    with pytest.raises(TrainerError, match="invalid TOML"):
        load_run_config(tmp_path / "bad.toml")


@pytest.mark.parametrize(
    "overrides, world, match",
    [
        ({"train": {"sequence_parallel": True}}, 2, "needs --tp > 1"),
        ({"parallel": {"tp": 3}}, 3, "tp=3 must divide"),
        ({"model": {"preset": "tiny-mla"}, "parallel": {"tp": 3}}, 3, "tp=3 must divide the model's 4 heads"),
        ({"parallel": {"pp": 3}}, 3, r"layers=4 must be divisible by pp\*vpp=3"),
        ({"parallel": {"ep": 2}}, 2, "needs a model with experts"),
        ({"model": {"preset": "tiny-moe"}, "parallel": {"ep": 3}}, 3, "ep=3 must divide the 4 experts"),
        ({"model": {"preset": "tiny-moe"}, "parallel": {"tp": 2}}, 2, "MoE with tp > 1 needs --sequence-parallel"),
        ({"parallel": {"cp": 2}, "train": {"seq_len": 126}}, 2, r"divisible by 2\*cp=4"),
        ({"train": {"global_batch": 6, "micro_batch": 4}}, 1, "global_batch=6 must be divisible"),
        ({"parallel": {"tp": 2}}, 3, "world_size=3"),
        ({"parallel": {"pp": 2}, "train": {"pipeline_schedule": "nope"}}, 2, "--pipeline-schedule nope"),
        (
            {"parallel": {"pp": 2}, "train": {"zero": 3, "pipeline_schedule": "zero-bubble", "global_batch": 8}},
            4,
            "--zero 3 with --pipeline-schedule zero-bubble",
        ),
        ({"parallel": {"dp_shard": 2}, "train": {"zero": 1}}, 4, r"parallel.dp_shard=2 \(HSDP\) needs train.zero=3"),
        ({"parallel": {"dp_shard": 3}, "train": {"zero": 3}}, 4, r"dp_shard=3 must divide dp=4 \(HSDP"),
        ({"model": {"preset": "tiny-hybrid"}, "data": {"packing": "pack"}}, 1, "data.packing='pack' with a hybrid"),
        ({"model": {"preset": "tiny-hybrid", "mtp_depth": 1}}, 1, "model.mtp_depth=1 with a hybrid"),
        (
            {"parallel": {"cp": 4, "cp_a2a": 2}},
            4,
            r"parallel.cp_a2a=2 is the inner all-to-all group of train.cp_attention='hierarchical', but "
            r"train.cp_attention='ring'",
        ),
        (
            {"parallel": {"cp": 4}, "train": {"cp_attention": "hierarchical"}},
            4,
            r"train.cp_attention='hierarchical' with cp=4 needs parallel.cp_a2a > 1",
        ),
        (
            {"parallel": {"tp": 2, "cp": 2, "cp_a2a": 2}, "train": {"cp_attention": "hierarchical"}},
            4,
            r"parallel.cp_a2a=2 must divide the query heads \(2\) and key/value heads \(1\) per TP rank \(tp=2\)",
        ),
        (
            {"parallel": {"tp": 2, "cp": 2}, "train": {"cp_attention": "ulysses"}},
            4,
            r"parallel.cp=2 must divide the query heads \(2\) and key/value heads \(1\) per TP rank",
        ),
        (
            {"model": {"backend": "te"}, "parallel": {"cp": 4, "cp_a2a": 2}, "train": {"cp_attention": "hierarchical"}},
            4,
            "model.backend='te' with train.cp_attention='hierarchical' is not supported yet",
        ),
        ({"parallel": {"pp": 2, "pipeline_layout": [3, 2]}}, 2, "sums to 5 layers, but the model has layers=4"),
        ({"parallel": {"pp": 2}, "train": {"pipeline_schedule": "zb-v"}}, 2, "vpp must be 2, got vpp=1"),
        (
            {
                "parallel": {"pp": 2, "vpp": 2},
                "train": {"zero": 3, "pipeline_schedule": "dualpipe-v", "global_batch": 8},
            },
            4,
            "--zero 3 with --pipeline-schedule dualpipe-v",
        ),
    ],
)
def test_impossible_runs_are_refused_with_the_rule(overrides, world, match):
    cfg = load_run_config(overrides=overrides)
    with pytest.raises(TrainerError, match=match):
        check_run(cfg, world)


def test_a_pipeline_layout_names_every_virtual_stage():
    with pytest.raises(TrainerError, match=r"pipeline_layout=\[4\] names 1 stages but pp\*vpp=2"):
        load_run_config(overrides={"parallel": {"pp": 2, "pipeline_layout": [4]}})
    with pytest.raises(TrainerError, match=r"pipeline_layout\[1\]=-1 must be an integer >= 0"):
        load_run_config(overrides={"parallel": {"pp": 2, "pipeline_layout": [5, -1]}})
    cfg = load_run_config(overrides={"parallel": {"pp": 2, "pipeline_layout": [4, 0]}})
    assert cfg.parallel.pipeline_layout == (4, 0) and check_run(cfg, 2).microbatches >= 1


@pytest.mark.parametrize(
    "overrides, world",
    [
        ({"parallel": {"tp": 2}, "train": {"sequence_parallel": True}}, 4),
        ({"parallel": {"tp": 2, "pp": 2}, "train": {"global_batch": 8}}, 8),
        (
            {
                "model": {"preset": "tiny-gpt2"},
                "parallel": {"pp": 2, "vpp": 2},
                "train": {"pipeline_schedule": "interleaved-1f1b", "micro_batch": 2, "global_batch": 8},
            },
            4,
        ),
        ({"train": {"precision": "fp16"}}, 2),
    ],
)
def test_zero3_combines_with_tp_pp_tied_embeddings_and_fp16(overrides, world):
    overrides.setdefault("train", {})["zero"] = 3
    assert check_run(load_run_config(overrides=overrides), world).microbatches >= 1


@pytest.mark.parametrize("zero", [1, 2])
def test_zero1_and_2_combine_with_moe_experts(zero):
    overrides = {"model": {"preset": "tiny-moe"}, "parallel": {"tp": 2, "ep": 2}, "train": {"zero": zero}}
    overrides["train"]["sequence_parallel"] = True
    assert check_run(load_run_config(overrides=overrides), 4).microbatches >= 1


def test_microbatches_follow_from_the_global_batch():
    cfg = load_run_config(overrides={"train": {"global_batch": 32, "micro_batch": 2}, "parallel": {"tp": 2}})
    assert check_run(cfg, 8).microbatches == 4  # dp = 4


def test_check_run_resolves_a_frozen_plan_that_round_trips_and_names_its_changes():
    overrides = {"train": {"micro_batch": 2, "precision": "bf16", "zero": 1}, "parallel": {"tp": 2, "pp": 2}}
    plan = check_run(load_run_config(overrides=overrides), 8)
    assert (plan.tp, plan.pp, plan.dp, plan.cp, plan.edp) == (2, 2, 2, 1, 2)
    assert (plan.micro_batch, plan.microbatches, plan.global_batch) == (2, 1, 4)  # global batch: micro * dp
    assert plan.tokens_per_step == 4 * plan.seq_len and plan.schedule == "1f1b"
    assert (plan.param_dtype, plan.compute_dtype, plan.grad_reduce_dtype, plan.zero) == ("bf16", "bf16", "fp32", 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.global_batch = 8
    assert RunPlan.from_dict(json.loads(json.dumps(plan.as_dict()))) == plan
    assert plan.describe_changes(plan) == "the run plan is the saved one"
    other = check_run(load_run_config(overrides={**overrides, "train": {"micro_batch": 2, "global_batch": 8}}), 4)
    assert other.describe_changes(plan) == (
        "layout changed (world_size 8->4, dp 2->1, edp 2->1, dp_shard 2->1, microbatches 1->4, zero 1->0); "
        "training changed (global_batch 4->8, precision bf16->fp32, param_dtype bf16->fp32, compute_dtype bf16->fp32)"
    )


def test_the_plan_records_hsdp_hierarchical_cp_and_the_layers_per_stage():
    """The sub-group sizes (HSDP's shard groups, hierarchical CP's all-to-all groups), the CP attention and
    the layers per stage are in the plan, its JSON round trip, the checkpoint's layout record and the resume
    line; a plan saved before they existed reads them as None and reports no change of them."""
    hsdp = check_run(load_run_config(overrides={"parallel": {"dp_shard": 2}, "train": {"zero": 3}}), 8)
    assert (hsdp.dp, hsdp.dp_shard, hsdp.dp_replicate, hsdp.cp_a2a, hsdp.cp_attention) == (8, 2, 4, 1, "ring")
    assert hsdp.layout_sizes() == {**hsdp.grid_sizes(), "dp_shard": 2, "cp_a2a": 1}
    assert "zero 3 (HSDP: shard 2 x replicate 4)" in hsdp.describe()
    zero1 = check_run(load_run_config(overrides={"train": {"zero": 1}}), 8)
    assert zero1.dp_shard == 8 and zero1.describe_changes(hsdp) == "layout changed (dp_shard 2->8, zero 3->1)"
    overrides = {
        "model": {"layers": 6},
        "parallel": {"cp": 4, "cp_a2a": 2, "pp": 2, "pipeline_layout": [4, 2]},
        "train": {"cp_attention": "hierarchical", "seq_len": 32},
    }
    cp = check_run(load_run_config(overrides=overrides), 8)
    assert (cp.cp_a2a, cp.cp_attention, cp.pipeline_layout, cp.dp_shard) == (2, "hierarchical", (4, 2), 1)
    assert "layers per stage [4, 2]; hierarchical attention (all-to-all groups of 2)" in cp.describe()
    assert RunPlan.from_dict(json.loads(json.dumps(cp.as_dict()))) == cp  # the layers per stage: a tuple again
    ring = {**overrides, "parallel": {"cp": 4, "pp": 2}, "train": {"seq_len": 32}}
    assert check_run(load_run_config(overrides=ring), 8).describe_changes(cp) == (
        "layout changed (cp_a2a 2->1, cp_attention hierarchical->ring, pipeline_layout (4, 2)->None)"
    )
    old = {k: v for k, v in cp.as_dict().items() if k not in ("dp_shard", "cp_a2a", "cp_attention", "pipeline_layout")}
    saved = RunPlan.from_dict(json.loads(json.dumps(old)))  # a checkpoint from before the fields
    assert saved.dp_shard is None and cp.describe_changes(saved) == "the run plan is the saved one"


def test_a_checkpoint_restores_dropout_streams_only_where_each_rank_holds_the_same_layers():
    from trainer.train.checkpoint import same_stages

    def summary(plan, values=True):
        return {
            "layout": plan.grid_sizes(),
            "values": {f"plan/{k}": v for k, v in plan.as_dict().items()} if values else {},
        }

    def plan(parallel, layers=4):
        return check_run(load_run_config(overrides={"model": {"layers": layers}, "parallel": parallel}), 4)

    even, uneven = plan({"pp": 2}), plan({"pp": 2, "pipeline_layout": [3, 1]})
    assert same_stages(even, summary(even)) and same_stages(uneven, summary(uneven))
    assert not same_stages(uneven, summary(even)) and not same_stages(even, summary(uneven))
    assert same_stages(even, summary(even, values=False)) and not same_stages(uneven, summary(uneven, values=False))
    assert not same_stages(plan({"dp": 4}), summary(even))
    hsdp = check_run(load_run_config(overrides={"parallel": {"dp_shard": 2}, "train": {"zero": 3}}), 4)
    assert same_stages(hsdp, summary(plan({}))) and same_stages(plan({}), summary(hsdp))  # the same grid


def test_lr_warmup_then_cosine_and_linear():
    optim = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=4, decay="cosine")
    assert [lr_at(s, optim, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, optim, 14) == pytest.approx(1.0)
    assert lr_at(13, optim, 14) == pytest.approx(0.1)
    assert lr_at(4 + 9 / 2, optim, 14) == pytest.approx(0.55)
    linear = OptimConfig(lr=1.0, min_lr=0.0, decay="linear")
    assert [lr_at(s, linear, 5) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_flops_per_token_matches_the_closed_form_for_gpt2():
    cfg = preset("gpt2")
    h, s, layers, v = 768, 1024, 12, 50257
    per_layer = 2 * 4 * h * h + 2 * 2 * s * h + 2 * 2 * h * 4 * h
    assert flops_per_token(cfg, s) == 3 * (layers * per_layer + 2 * h * v)
    assert math.isclose(flops_per_token(cfg, s) / 1e9, 0.854, rel_tol=1e-3)


def counted_forward_flops(name: str, seq: int) -> tuple[float, float]:
    """PyTorch's FLOP counter over one forward of ``seq`` tokens (times 3, per token), and our count."""
    cfg = preset(name).with_overrides(vocab_size=97)
    with pstate.initialize(pstate.ParallelConfig()) as ps, torch.no_grad():
        (chunk,) = build_chunks(cfg, ModelGroups.from_state(ps), pp_rank=0, pp=1, seed=0)
        with FlopCounterMode(display=False) as counter:
            chunk(torch.zeros(2, seq, dtype=torch.long))
    return 3 * counter.get_total_flops() / (2 * seq), flops_per_token(cfg, seq)


def test_mla_flops_per_token_are_the_counted_matmuls(run_ranks):
    """Every MLA matmul (the scores over the query/key width, the outputs over v_head_dim) is counted:
    PyTorch's counter, which counts attention scores in full as we do, finds the same total."""
    ((counted, ours),) = run_ranks(1, counted_forward_flops, "tiny-mla", 32)
    assert ours == counted


def test_hierarchical_context_parallelism_is_accepted_where_the_heads_split():
    cfg = load_run_config(overrides={"parallel": {"cp": 4, "cp_a2a": 2}, "train": {"cp_attention": "hierarchical"}})
    assert cfg.parallel.cp_a2a == 2 and check_run(cfg, 8).microbatches >= 1
    cfg = load_run_config(overrides={"parallel": {"cp": 4, "cp_a2a": 4}, "train": {"cp_attention": "hierarchical"}})
    with pytest.raises(TrainerError, match=r"parallel.cp_a2a=4 must divide the query heads \(4\)"):
        check_run(cfg, 4)

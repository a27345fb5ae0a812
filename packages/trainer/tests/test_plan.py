"""``trainer plan``: exact parameter counts, layouts that obey every rule and fit, and the command line."""

import json

import pytest

import pstate
from trainer.cli import main
from trainer.config import RunConfig, TrainConfig, check_run
from trainer.model import ModelGroups, build_chunks, model_shards, preset
from trainer.plan import Cluster, parameter_count, plan

VARIANTS = {  # the newer shape options: per-part biases, QK norms, wider heads, a gated shared expert
    "tiny-qwen": dict(qkv_bias=True, qk_norm=True, kv_channels=32),
    "tiny-moe-shared": dict(moe_shared_ffn_hidden=96, moe_shared_gate=True, proj_bias=True),
}


def _model(name: str):
    base = "tiny-moe" if name == "tiny-moe-shared" else "tiny" if name == "tiny-qwen" else name
    return preset(base).with_overrides(vocab_size=257, **VARIANTS.get(name, {}))


def counted(name: str) -> int:
    cfg = _model(name)
    with pstate.initialize(pstate.ParallelConfig()) as ps:
        (chunk,) = build_chunks(cfg, ModelGroups.from_state(ps), pp_rank=0, pp=1, seed=0)
        return sum(s.data.numel() for s in model_shards([chunk]).values())


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2", "tiny-moe", "tiny-qwen", "tiny-moe-shared", "tiny-mla"])
def test_parameter_count_is_the_model_s(run_ranks, name):
    assert sum(parameter_count(_model(name))) == run_ranks(1, counted, name)[0]


def test_parameter_counts_of_known_models():
    assert sum(parameter_count(preset("gpt2"))) == 124_439_808  # Hugging Face's gpt2
    assert sum(parameter_count(preset("llama3-8b"))) == 8_030_261_248  # Meta-Llama-3-8B
    assert sum(parameter_count(preset("llama3-70b"))) == 70_553_706_496  # Meta-Llama-3-70B
    assert sum(parameter_count(preset("mixtral-8x7b"))) == 46_702_792_704  # Mixtral-8x7B-v0.1
    assert sum(parameter_count(preset("mixtral-8x22b"))) == 140_630_071_296  # Mixtral-8x22B-v0.1


def test_plans_obey_the_rules_and_fit():
    cluster = Cluster(gpus=16, memory_gib=40)
    plans = plan(preset("llama3-8b"), cluster, seq_len=4096, global_batch=64, top=20)
    steps = [round(p.step_s, 3) for p in plans]  # within a millisecond the simpler layout comes first
    assert plans and steps == sorted(steps)
    for p in plans:
        assert p.memory.total <= cluster.profile.usable_bytes
        train = TrainConfig(seq_len=4096, micro_batch=p.micro_batch, global_batch=64, zero=p.zero,
                            recompute=p.recompute, sequence_parallel=p.sequence_parallel,
                            pipeline_schedule=p.layout.schedule)  # fmt: skip
        check_run(RunConfig(model=preset("llama3-8b"), parallel=p.parallel, train=train), cluster.gpus)


def test_more_memory_never_makes_a_plan_slower():
    small = plan(preset("llama3-8b"), Cluster(gpus=8, memory_gib=24), seq_len=4096, global_batch=32)
    large = plan(preset("llama3-8b"), Cluster(gpus=8, memory_gib=80), seq_len=4096, global_batch=32)
    assert large[0].step_s <= small[0].step_s


def test_nothing_fits_names_the_smallest_cluster(capsys):
    code = main(["plan", "--model", "llama3-8b", "--gpus", "1", "--gpu-memory", "8", "--seq-len", "4096",
                 "--global-batch", "8"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1 and "no layout fits" in out
    assert "the smallest cluster of h100-sxm that holds it has 64 GPUs (8 nodes)" in out


def test_plan_command_prints_the_best_as_a_train_command(capsys):
    code = main(["plan", "--model", "gpt2", "--gpus", "8", "--seq-len", "1024", "--global-batch", "64", "--top", "3"])
    out = capsys.readouterr().out
    assert code == 0
    assert "best: trainer train --model gpt2 --seq-len 1024 --global-batch 64" in out
    assert "#1 and #2 tie" in out and "activations" in out and "pipeline bubble" not in out


def test_the_best_command_parses_as_trainer_train_and_passes_check_run(capsys):
    from trainer.cli import build_parser
    from trainer.commands import overrides_from
    from trainer.config import load_run_config

    main(["plan", "--model", "llama3-8b", "--gpus", "64", "--seq-len", "4096", "--global-batch", "256", "--json"])
    best = json.loads(capsys.readouterr().out)["layouts"][0]
    args = build_parser().parse_args(best["command"].split()[1:])
    cfg = load_run_config(None, overrides_from(args))
    assert check_run(cfg, 64).microbatches == best["layout"]["microbatches"]
    assert cfg.parallel.tp == best["layout"]["tp"] and cfg.train.zero == best["layout"]["zero"]


def test_evaluate_mode_explains_one_layout(capsys):
    argv = ["plan", "--model", "llama3-8b", "--gpus", "64", "--seq-len", "4096", "--global-batch", "256",
            "--tp", "8", "--pp", "4", "--recompute", "full", "--sequence-parallel", "--micro-batch", "1"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("fits:") and "pipeline bubble" in out and "recompute" in out
    assert "command: trainer train --model llama3-8b" in out and "--recompute full" in out


def test_an_impossible_layout_is_refused_in_check_run_s_words(capsys):
    argv = ["plan", "--model", "llama3-8b", "--gpus", "64", "--seq-len", "4096", "--global-batch", "256", "--tp", "16"]
    assert main(argv) == 2
    assert "tp=16 must divide the model's 8 key/value heads" in capsys.readouterr().err


def test_unknown_hardware_lists_the_known(capsys):
    argv = ["plan", "--model", "gpt2", "--gpus", "8", "--seq-len", "1024", "--global-batch", "64", "--hardware", "h300"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "'h300': unknown" in err and "a100-40gb, a100-80gb, b200, h100-sxm, h200, mi300x" in err


def test_json_gives_every_figure(capsys):
    argv = ["plan", "--model", "tiny-moe", "--vocab-size", "256", "--gpus", "8", "--seq-len", "128",
            "--global-batch", "16", "--hardware", "mi300x", "--top", "2", "--json"]  # fmt: skip
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["hardware"]["name"] == "mi300x" and len(data["layouts"]) == 2
    first = data["layouts"][0]
    assert first["memory_bytes"]["total"] == pytest.approx(
        sum(v for k, v in first["memory_bytes"].items() if k not in ("total", "usable"))
    )
    assert first["time_s"]["step"] == pytest.approx(sum(v for k, v in first["time_s"].items() if k != "step"))


def test_a_config_json_model_comes_back_from_the_printed_command(tmp_path, capsys):
    from trainer.cli import build_parser
    from trainer.commands import overrides_from
    from trainer.config import load_run_config
    from trainer.hf import hf_config

    model = preset("tiny").with_overrides(vocab_size=512, kv_heads=4, ffn_hidden=192)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model)))
    argv = ["plan", "--model", str(tmp_path), "--gpus", "4", "--seq-len", "128", "--global-batch", "16", "--json"]
    assert main(argv) == 0
    best = json.loads(capsys.readouterr().out)["layouts"][0]
    args = build_parser().parse_args([a.replace('"', "") for a in best["command"].split()[1:]])  # as a shell would
    cfg = load_run_config(None, overrides_from(args))
    assert parameter_count(cfg.model) == parameter_count(model)
    assert check_run(cfg, 4).microbatches == best["layout"]["microbatches"]


def test_hierarchical_cp_plans_choose_the_all_to_all_group_and_pass_check_run(capsys):
    """With ``train.cp_attention='hierarchical'`` the search tries each inner all-to-all size that splits a
    TP rank's heads; every printed command carries it and is a run ``check_run`` accepts."""
    from trainer.cli import build_parser
    from trainer.commands import overrides_from
    from trainer.config import load_run_config

    argv = ["plan", "--model", "llama3-8b", "--gpus", "64", "--seq-len", "32768", "--global-batch", "64",
            "--cp", "4", "--set", 'train.cp_attention="hierarchical"', "--top", "4", "--json"]  # fmt: skip
    assert main(argv) == 0
    layouts = json.loads(capsys.readouterr().out)["layouts"]
    assert layouts and all(item["layout"]["cp_a2a"] in (2, 4) for item in layouts)
    for item in layouts:
        L = item["layout"]
        assert 8 // L["tp"] % L["cp_a2a"] == 0  # the key/value heads of a TP rank split over the group
        assert f"--set parallel.cp_a2a={L['cp_a2a']}" in item["command"]
        args = build_parser().parse_args(item["command"].split()[1:])
        cfg = load_run_config(None, overrides_from(args))
        assert cfg.train.cp_attention == "hierarchical" and cfg.parallel.cp_a2a == L["cp_a2a"]
        assert check_run(cfg, 64).microbatches == L["microbatches"]

"""Hugging Face families imported exactly: a random tiny model made by ``transformers`` itself (never
downloaded), fuzzed over each family's options (GQA ratio, head_dim, rope type and scaling, tied or
untied, biases, QK-norm, experts and top-k, shared expert, norm_topk_prob), saved, imported with
``trainer convert``'s API, and run by our model at TP1, TP2 and PP2 (EP2 for the experts): the logits
equal ``transformers``' on the same tokens. Exporting the import gives back every original tensor
bit for bit, and ``transformers`` loads the export.

Tolerance: rtol/atol 1e-4 on fp32 logits (as test_convert): the two implementations order their sums
differently (fused projections, SDPA, TP partial sums), which moves the last bits; a dropped config
key (theta, scaling, head_dim, a bias) moves logits by O(1).
"""

import json
import random

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 101, 24


def _rope(rng: random.Random) -> dict:
    theta = rng.choice([10000.0, 500000.0])
    kind = rng.choice(["default", "linear", "llama3"])
    if kind == "default":
        return {"rope_type": "default", "rope_theta": theta}
    if kind == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": rng.choice([2.0, 4.0])}
    return {
        "rope_type": "llama3", "rope_theta": theta, "factor": rng.choice([8.0, 32.0]),
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
    }  # fmt: skip


def _attention(rng: random.Random) -> dict:
    heads = rng.choice([4, 8])
    kv = rng.choice([h for h in (2, 4, 8) if heads % h == 0])
    head_dim = rng.choice([8, 16, 24])
    return dict(num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim)


def family_config(kind: str, seed: int) -> "transformers.PretrainedConfig":
    rng = random.Random(f"{kind}-{seed}")
    if kind == "mamba2":  # 8 heads of 12 in 2 groups (TP2 splits both), chunks of 8 over the 24 tokens
        return transformers.Mamba2Config(
            hidden_size=48, num_hidden_layers=2, vocab_size=VOCAB, num_heads=8, head_dim=12, expand=2,
            n_groups=2, state_size=rng.choice([8, 16]), conv_kernel=rng.choice([3, 4]), chunk_size=8,
            layer_norm_epsilon=1e-5, initializer_range=0.25, tie_word_embeddings=rng.random() < 0.5,
        )  # fmt: skip
    common = dict(
        hidden_size=48, num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=64,
        rms_norm_eps=1e-6, initializer_range=0.25, intermediate_size=rng.choice([32, 64]),
        tie_word_embeddings=rng.random() < 0.5,
        rope_parameters=_rope(rng), **_attention(rng),
    )  # fmt: skip
    if kind == "llama":
        return transformers.LlamaConfig(attention_bias=rng.random() < 0.5, mlp_bias=rng.random() < 0.5, **common)
    if kind == "mistral":
        return transformers.MistralConfig(sliding_window=None, **common)
    if kind == "qwen2":
        return transformers.Qwen2Config(**common)
    if kind == "qwen3":
        return transformers.Qwen3Config(attention_bias=rng.random() < 0.5, **common)
    moe = dict(num_experts_per_tok=rng.choice([1, 2]), router_aux_loss_coef=0.0)
    if kind == "mixtral":
        return transformers.MixtralConfig(num_local_experts=4, **moe, **common)
    moe.update(num_experts=4, moe_intermediate_size=rng.choice([16, 32]), norm_topk_prob=rng.random() < 0.5)
    if kind == "qwen2_moe":
        return transformers.Qwen2MoeConfig(shared_expert_intermediate_size=24, **moe, **common)
    return transformers.Qwen3MoeConfig(**moe, **common)


def deepseek_config(seed: int) -> "transformers.PretrainedConfig":
    """A dense DeepSeek-V3 (every layer dense), fuzzed over MLA's
    shapes: direct or low-rank queries, v_head_dim above or below the query/key width, rope interleave."""
    rng = random.Random(f"deepseek_v3-{seed}")
    return transformers.DeepseekV3Config(
        hidden_size=48, num_hidden_layers=2, first_k_dense_replace=2, vocab_size=VOCAB, max_position_embeddings=64,
        rms_norm_eps=1e-6, initializer_range=0.25, intermediate_size=rng.choice([32, 64]),
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=rng.choice([None, 24]),
        kv_lora_rank=rng.choice([16, 32]), qk_nope_head_dim=rng.choice([8, 16]), qk_rope_head_dim=rng.choice([4, 8]),
        v_head_dim=rng.choice([8, 24]), rope_interleave=rng.random() < 0.5,
        tie_word_embeddings=rng.random() < 0.5, rope_parameters=_rope(rng),
    )  # fmt: skip


YARN = {
    "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
    "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.5,
}  # fmt: skip
"""YaRN past its original context (SEQ > 16) with mscale != mscale_all_dim: the rotary attention factor and
MLA's softmax correction both differ from 1."""


def deepseek_moe_config(seed: int, rope: dict | None = None) -> "transformers.PretrainedConfig":
    """A DeepSeek-V3 with a dense first layer and an MoE second one: sigmoid router in 2 groups of which a
    token uses 1, a shared expert, routed scaling != 1 (the expert bias is drawn by :func:`hf_model`)."""
    rng = random.Random(f"deepseek_v3_moe-{seed}")
    return transformers.DeepseekV3Config(
        hidden_size=48, num_hidden_layers=2, first_k_dense_replace=1, vocab_size=VOCAB, max_position_embeddings=64,
        rms_norm_eps=1e-6, initializer_range=0.25, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=rng.choice([None, 24]), kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=rng.choice([8, 24]), rope_interleave=rng.random() < 0.5,
        tie_word_embeddings=False, rope_parameters=rope or _rope(rng), n_routed_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=rng.choice([1, 2]), n_group=2,
        topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
    )  # fmt: skip


CONFIGS = {"deepseek_v3": deepseek_config, "deepseek_v3_moe": deepseek_moe_config, "deepseek_v3_yarn": None}


def hf_model(kind: str, seed: int, path):
    torch.manual_seed(seed)
    if kind == "deepseek_v3_yarn":
        config = deepseek_moe_config(seed, YARN)
    else:
        config = CONFIGS[kind](seed) if kind in CONFIGS else family_config(kind, seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # biases and norms start at 0 / 1: draw them so a lost one shows
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("bias", ".A_log", ".D")) or "norm" in name:
                p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(path)
    return model


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))


def import_dir(hf: str, save: str) -> str:
    from trainer.convert import import_from_hf

    return str(import_from_hf(hf, save))


def our_logits(save: str, parallel: dict, sequence_parallel: bool = False, hf: str | None = None):
    """The imported model's logits at ``parallel`` (gathered on the last stage's TP rank 0); with ``hf``
    each rank reads its pieces straight from the Hugging Face folder instead (streaming load)."""
    import ckpt
    import pstate
    from tp_layers import gather_from_region
    from trainer.config import parse_run_config
    from trainer.hf.stream import load_hf_pieces
    from trainer.model import ModelGroups, build_chunks, weights_state

    found = ckpt.latest(save)
    cfg = parse_run_config(ckpt.load({"config": ""}, found)["config"])
    with pstate.initialize(pstate.ParallelConfig(**parallel)) as ps:
        groups = ModelGroups.from_state(ps, sequence_parallel=sequence_parallel)
        (chunk,) = build_chunks(cfg.model, groups, pp_rank=ps.pp.rank, pp=ps.pp.size, seed=0)
        if hf is None:
            ckpt.load(weights_state([chunk]), found)
        else:
            load_hf_pieces([chunk], hf)
        ids = tokens()
        with torch.no_grad():
            if ps.pp.rank == 0:
                x = chunk(ids)
            else:
                x = torch.empty(SEQ // ps.tp.size if sequence_parallel else SEQ, 2, cfg.model.hidden)
                dist.recv(x, group=ps.pp.group, group_src=0)
                x = chunk(x)
            if ps.pp.rank < ps.pp.size - 1:
                dist.send(x, group=ps.pp.group, group_dst=ps.pp.rank + 1)
                return None
            logits = gather_from_region(x, group=ps.tp.group)
        return logits[:, :, :VOCAB].transpose(0, 1)


def export_dir(save: str, out: str) -> str:
    from trainer.convert import export_to_hf

    return str(export_to_hf(save, out))


DENSE = ["llama", "mistral", "qwen2", "qwen3"]
MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]
LAYOUTS = {
    "tp1": (1, {}, {}),
    "tp2": (2, dict(tp=2), {}),
    "pp2": (2, dict(pp=2), {}),
    "tp2-streamed": (2, dict(tp=2), dict(stream=True)),
}
MOE_LAYOUTS = {
    "tp1": (1, {}, {}),
    "ep2": (2, dict(ep=2), {}),
    "pp2": (2, dict(pp=2), {}),
    "ep2-pp2-streamed": (4, dict(ep=2, pp=2), dict(stream=True)),
}


def check_family(run_ranks, tmp_path, kind, seed, layouts):
    hf, save = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    model = hf_model(kind, seed, hf)
    with torch.no_grad():
        expected = model(tokens()).logits
    run_ranks(1, import_dir, hf, save)
    for name, (world, parallel, options) in layouts.items():
        options = ({"hf": hf} if options.get("stream") else {}) | {"sequence_parallel": bool(options.get("sp"))}
        results = [r for r in run_ranks(world, our_logits, save, parallel, **options) if r is not None]
        for ours in results:
            torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    # import then export gives back every original tensor exactly; transformers reads the export
    out = str(tmp_path / "out")
    run_ranks(1, export_dir, save, out)
    first, second = load_file(f"{hf}/model.safetensors"), load_file(f"{out}/model.safetensors")
    if model.config.tie_word_embeddings:
        first.pop("lm_head.weight", None)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    again = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(tokens()).logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind", DENSE)
def test_dense_family_logits_equal_transformers(run_ranks, tmp_path, kind, seed):
    check_family(run_ranks, tmp_path, kind, seed, LAYOUTS)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind", MOE)
def test_moe_family_logits_equal_transformers(run_ranks, tmp_path, kind, seed):
    check_family(run_ranks, tmp_path, kind, seed, MOE_LAYOUTS)


@pytest.mark.parametrize("seed", [0, 2, 3])  # low-rank/direct queries, v wider/narrower, interleaved or not
def test_deepseek_v3_mla_logits_equal_transformers(run_ranks, tmp_path, seed):
    check_family(run_ranks, tmp_path, "deepseek_v3", seed, LAYOUTS)


DEEPSEEK_MOE_LAYOUTS = {
    "tp1": (1, {}, {}),
    "ep2": (2, dict(ep=2), {}),
    "tp2-sp": (2, dict(tp=2), dict(sp=True)),
    "ep2-streamed": (2, dict(ep=2), dict(stream=True)),
}


@pytest.mark.parametrize(("kind", "seed"), [("deepseek_v3_moe", 0), ("deepseek_v3_moe", 1), ("deepseek_v3_yarn", 0)])
def test_deepseek_v3_moe_logits_equal_transformers(run_ranks, tmp_path, kind, seed):
    """Dense then MoE layers, the router's groups, bias and scaling, the shared expert; and YaRN."""
    check_family(run_ranks, tmp_path, kind, seed, DEEPSEEK_MOE_LAYOUTS)


def test_deepseek_v3_moe_fields_are_read():
    from trainer.hf import hf_config, model_from_hf

    model = model_from_hf(deepseek_moe_config(0, YARN).to_dict())
    assert (model.num_experts, model.moe_topk, model.moe_ffn, model.moe_first_dense) == (8, 2, 16, 1)
    assert (model.moe_score, model.moe_num_groups, model.moe_topk_groups, model.moe_routed_scaling) == (
        "sigmoid", 2, 1, 2.5)  # fmt: skip
    assert model.moe_expert_bias and model.moe_shared_ffn_hidden in (16, 32) and not model.moe_shared_gate
    assert (model.rope_type, model.rope_factor, model.rope_original_max_len) == ("yarn", 4.0, 16)
    assert (model.rope_mscale, model.rope_mscale_all_dim) == (1.0, 0.5)
    assert [model.is_moe_layer(i) for i in range(2)] == [False, True]
    assert model_from_hf(hf_config(model)) == model


@pytest.mark.parametrize(
    "yarn",
    [YARN, {**YARN, "mscale": 0.0, "beta_fast": 8.0, "beta_slow": 2.0}, {**YARN, "factor": 40.0, "rope_theta": 1e6}],
)
def test_yarn_frequencies_and_attention_factor_equal_transformers(yarn):
    """transformers' own YaRN parameters (``_compute_yarn_parameters``) for our rotary width, bit for bit."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from trainer.hf import model_from_hf
    from trainer.model.rotary import inverse_frequencies, rotary_scale

    config = deepseek_moe_config(0, yarn)
    inv_freq, factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    model = model_from_hf(config.to_dict())
    assert torch.equal(inverse_frequencies(model), inv_freq)
    assert rotary_scale(model) == factor


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rope_factor": 0.5}, "model.rope_factor=0.5: must be >= 1 for yarn"),
        ({"rope_beta_fast": 1.0}, "model.rope_beta_fast=1.0: must exceed rope_beta_slow"),
        ({"rope_beta_slow": 0.0}, "model.rope_beta_slow=0.0: must be > 0"),
        ({"rope_mscale_all_dim": -1.0}, "model.rope_mscale_all_dim=-1.0: must be >= 0"),
    ],
)
def test_yarn_fields_are_checked_by_name(change, message):
    from trainer.errors import TrainerError
    from trainer.model import preset

    with pytest.raises(TrainerError, match=message):
        preset("tiny-mla").with_overrides(rope_type="yarn", **({"rope_factor": 4.0} | change))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_experts_per_tok": 1}, "num_experts_per_tok=1: a sigmoid router with one expert"),
        ({"norm_topk_prob": False}, "norm_topk_prob=False"),
        ({"scoring_func": "softmax"}, "scoring_func='softmax'"),
        ({"n_shared_experts": 0}, "n_shared_experts=0"),
        ({"moe_layer_freq": 2}, "moe_layer_freq=2"),
        ({"rope_parameters": {**YARN, "attention_factor": 1.5}}, "attention_factor=1.5"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "mscale": 1.0}}, "mscale=1.0: only read with"),
    ],
)
def test_deepseek_v3_moe_settings_we_compute_differently_are_refused_by_name(change, message):
    from trainer.errors import TrainerError
    from trainer.hf import model_from_hf

    with pytest.raises(TrainerError, match=message):
        model_from_hf(deepseek_moe_config(0).to_dict() | change)


@pytest.mark.parametrize("seed", [0, 1])
def test_mamba2_logits_equal_transformers(run_ranks, tmp_path, seed):
    check_family(run_ranks, tmp_path, "mamba2", seed, LAYOUTS)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"time_step_limit": [0.0, 0.5]}, "time_step_limit=[0.0, 0.5]: clamping the step size is not supported"),
        ({"use_bias": True}, "use_bias=True: projection biases are not supported"),
        ({"num_heads": 6}, "num_heads=6: num_heads*head_dim=72 must be expand*hidden_size"),
        ({"n_groups": 3}, "model.mamba_groups=3: must divide the 8 Mamba heads"),
    ],
)
def test_mamba2_keys_that_change_the_math_are_refused_by_name(change, message):
    from trainer.errors import TrainerError
    from trainer.hf import family, model_from_hf

    config = dict(model_type="mamba2", hidden_size=48, num_hidden_layers=2, num_heads=8, head_dim=12, vocab_size=VOCAB)
    assert family(model_from_hf(config)) == "mamba2"
    with pytest.raises(TrainerError, match=message.replace("(", r"\(").replace("[", r"\[").replace("*", r"\*")):
        model_from_hf({**config, **change})
    hybrid = model_from_hf(config).with_overrides(layer_pattern="M*")
    with pytest.raises(TrainerError, match="only all-Mamba RMSNorm models convert"):
        family(hybrid)


def test_llama3_rope_and_head_dim_from_transformers_5_config(tmp_path, run_ranks):
    """The issue's case: theta and llama3 scaling inside ``rope_parameters``, head_dim != hidden/heads."""
    config = transformers.LlamaConfig(
        hidden_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "rope_theta" not in saved and saved["rope_parameters"]["rope_theta"] == 500000.0
    from trainer.hf import model_from_hf

    model = model_from_hf(saved)
    assert (model.rope_theta, model.rope_type, model.rope_factor, model.head_dim) == (500000.0, "llama3", 8.0, 16)
    assert model.tied_embeddings


def test_legacy_rope_scaling_keys_are_read():
    from trainer.hf import model_from_hf

    legacy = dict(
        model_type="llama", hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        vocab_size=VOCAB, max_position_embeddings=128, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
    )  # fmt: skip
    model = model_from_hf(legacy)
    assert (model.rope_theta, model.rope_type, model.rope_original_max_len) == (500000.0, "llama3", 64)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "factor": 2.0}}, "rope_type='longrope'"),
        ({"sliding_window": 16}, "sliding_window=16"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"attention_dropout": 0.1}, "attention_dropout=0.1"),
        ({"attn_logit_softcapping": 30.0}, "attn_logit_softcapping=30.0: not understood"),
        ({"model_type": "gemma"}, "model_type='gemma'"),
    ],
)
def test_config_keys_that_change_the_math_are_refused_by_name(change, message):
    from trainer.errors import TrainerError
    from trainer.hf import model_from_hf

    config = dict(
        model_type="mistral", hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        vocab_size=VOCAB, max_position_embeddings=128, sliding_window=None,
    )  # fmt: skip
    with pytest.raises(TrainerError, match=message.replace("(", r"\(").replace("[", r"\[")):
        model_from_hf({**config, **change})


def import_at(hf: str, save: str, parallel: dict) -> str:
    from trainer.convert import import_from_hf

    return str(import_from_hf(hf, save, parallel=parallel))


def saved_tensors(save: str) -> dict:
    import ckpt
    import pstate
    from trainer.config import parse_run_config
    from trainer.model import ModelGroups, build_chunks, model_shards

    found = ckpt.latest(save)
    cfg = parse_run_config(ckpt.load({"config": ""}, found)["config"])
    with pstate.initialize(pstate.ParallelConfig()) as ps:
        shards = model_shards(build_chunks(cfg.model, ModelGroups.from_state(ps), pp_rank=0, pp=1, seed=0))
        ckpt.load({"model": shards}, found)
        return {name: s.data.clone() for name, s in shards.items()}


@pytest.mark.parametrize(
    ("kind", "world", "parallel"), [("llama", 4, dict(tp=2, pp=2)), ("qwen2_moe", 4, dict(ep=2, pp=2))]
)
def test_import_at_a_layout_saves_what_the_one_process_import_saves(run_ranks, tmp_path, kind, world, parallel):
    """``trainer convert --from-hf --tp/--pp/--ep`` under torchrun: each rank reads its slices."""
    hf = str(tmp_path / "hf")
    hf_model(kind, 0, hf)
    run_ranks(1, import_at, hf, str(tmp_path / "one"), {})
    run_ranks(world, import_at, hf, str(tmp_path / "layout"), parallel)
    one, layout = (
        run_ranks(1, saved_tensors, str(tmp_path / "one"))[0],
        run_ranks(1, saved_tensors, str(tmp_path / "layout"))[0],
    )
    assert one.keys() == layout.keys()
    for name in one:
        assert torch.equal(one[name], layout[name]), name


def train_one_step(imported: str, save: str, cache: str) -> None:
    from trainer.config import load_run_config
    from trainer.convert import with_checkpoint_model
    from trainer.train.loop import train

    overrides = {
        "parallel": {"ep": 2},
        "train": {"steps": 1, "seq_len": 16, "micro_batch": 2, "global_batch": 4, "save": save, "load": imported},
        "data": {"cache_dir": cache},
    }
    list(train(with_checkpoint_model(load_run_config(overrides=overrides), explicit_model=False)))


def expert_bias(save: str) -> torch.Tensor:
    import ckpt

    found = ckpt.latest(save)
    bias = torch.zeros(8)
    ckpt.load({"expert_bias": {"layers.1.mlp.router.expert_bias": bias}}, found)
    return bias


def test_training_from_an_imported_deepseek_v3_starts_from_its_expert_bias(run_ranks, tmp_path):
    """``train --load`` of the weights-only import takes the routers' biases too: one step later each has
    moved by the update rate from transformers' ``e_score_correction_bias``, not from zero."""
    hf, imported, trained = (str(tmp_path / n) for n in ("hf", "imported", "trained"))
    torch.manual_seed(0)
    config = deepseek_moe_config(0)
    config.vocab_size = 257  # the byte tokenizer's ids
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.model.layers[1].mlp.gate.e_score_correction_bias.normal_(0, 0.5)
    model.save_pretrained(hf)
    run_ranks(1, import_dir, hf, imported)
    run_ranks(2, train_one_step, imported, trained, str(tmp_path / "cache"))
    start = model.model.layers[1].mlp.gate.e_score_correction_bias
    moved = expert_bias(trained) - start
    # the bias is of order 0.5: float32 keeps the 1e-3 step to about 6e-8
    torch.testing.assert_close(moved.abs(), torch.full((8,), 1e-3), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"moe_score": "softmax"}, "model.moe_score='softmax': DeepSeek-V3's MoE layers have 'sigmoid'"),
        ({"moe_expert_bias": False}, "model.moe_expert_bias=False: DeepSeek-V3's MoE layers have True"),
        ({"moe_shared_gate": True}, "model.moe_shared_gate=True: DeepSeek-V3's MoE layers have False"),
        ({"moe_shared_ffn_hidden": 24}, "model.moe_shared_ffn_hidden=24: DeepSeek-V3's shared expert is a positive"),
        ({"moe_shared_ffn_hidden": None}, "model.moe_shared_ffn_hidden=None"),
        ({"moe_topk": 1}, "model.moe_topk=1: transformers renormalizes one sigmoid score"),
    ],
)
def test_mla_moe_choices_deepseek_v3_lacks_are_refused_on_export(change, message):
    from trainer.errors import TrainerError
    from trainer.hf import hf_config, model_from_hf

    model = model_from_hf(deepseek_moe_config(0).to_dict())
    with pytest.raises(TrainerError, match=message):
        hf_config(model.with_overrides(**change))

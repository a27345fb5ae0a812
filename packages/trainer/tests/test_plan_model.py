"""The planner's models against hand-computed values: activations (Korthikanti et al. 2022), model
states under each ZeRO stage, FLOPs, the simulator's pipeline costs, hardware profiles and shapes."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pp_sched import build, simulate
from trainer.config import check_run
from trainer.convert import hf_config
from trainer.errors import TrainerError
from trainer.model import ModelConfig, preset
from trainer.plan import (
    Cluster,
    Layout,
    Workload,
    estimate,
    evaluate,
    known_hardware,
    layer_activations,
    load_hardware,
    model_from_hf_config,
    parameter_count,
    pipeline_cost,
    plan,
    resolve_model,
)  # fmt: skip
from trainer.plan.memory import memory
from trainer.plan.pipeline import _simulated
from trainer.plan.timing import layer_flops
from trainer.train.flops import flops_per_token

# GPT-3's layer as the paper counts it: LayerNorm, GELU with a 4h FFN, dropout, 16-bit everywhere
GPT3 = ModelConfig(hidden=64, layers=4, heads=4, ffn_hidden=256, vocab_size=100, norm="layernorm",
                   position="learned", mlp="gelu", bias=True, tied_embeddings=True, dropout=0.1)  # fmt: skip
PAPER = dict(act_bytes=2, residual_bytes=2, flash=False)


@pytest.mark.parametrize("t", [1, 2, 4])
def test_korthikanti_activations_per_layer(t):
    s, b, h, a = 32, 2, GPT3.hidden, GPT3.heads
    sbh = s * b * h
    assert layer_activations(GPT3, s, b, 1, **PAPER) == sbh * (34 + 5 * a * s / h)  # their eq. (1)
    assert layer_activations(GPT3, s, b, t, **PAPER) == sbh * (10 + 24 / t + 5 * a * s / (h * t))  # eq. (2)
    assert layer_activations(GPT3, s, b, t, sp=True, **PAPER) == sbh / t * (34 + 5 * a * s / h)  # eq. (4)
    selective = layer_activations(GPT3, s, b, t, sp=True, recompute="selective", **PAPER)
    assert selective == 34 * sbh / t  # eq. (6)
    assert layer_activations(GPT3, s, b, t, recompute="full", **PAPER) == 2 * sbh  # full: the layer's input


def test_activations_of_our_layer_hand_counted():
    # tiny: hidden 64, 4 heads of 16, 2 KV heads, SwiGLU FFN 128, rotary, RMSNorm, no dropout; bf16
    # autocast keeps the residual stream in fp32 (4 bytes) and the matmul inputs in 16-bit (2 bytes)
    m, s, b = preset("tiny"), 16, 2
    expected = (
        2 * s * b * 64 * 4  # the two norms' inputs, fp32
        + 2 * s * b * 64 * 2  # the QKV and first MLP projections' inputs
        + s * b * (64 + 2 * 32) * 2  # Q, K, V
        + s * b * (64 + 32) * 2  # rotated Q and K
        + 4 * s * b * 4  # the fused attention's log-sum-exp per head and token, fp32
        + s * b * 64 * 2  # the output projection's input
        + 4 * s * b * 128 * 2  # SwiGLU: the fused gate/up output (2 ffn), silu(gate), and the product
    )
    assert layer_activations(m, s, b) == expected
    # PyTorch's composite RMSNorm (CPU) also keeps each norm's normalised input for the weight product
    assert layer_activations(m, s, b, fused_norm=False) == expected + 2 * s * b * 64 * 4


def _states(zero: int, d: int) -> float:
    m = preset("tiny").with_overrides(vocab_size=256)
    work = Workload(m, 64, 8 * d, "fp32")
    layout = Layout(world=d, zero=zero, micro_batch=1)
    mem = memory(work, layout, pipeline_cost("1f1b", 1, 1, 8), 1e12)
    return mem.parts, sum(parameter_count(m))


# bytes per parameter: fp32 weights, fp32 gradients (ZeRO-1: the full local ones and the reduced shard),
# two fp32 AdamW moments, sharded over 4 ranks as each stage does
@pytest.mark.parametrize("zero, per_param", [(0, 16), (1, 4 + 4 + 4 / 4 + 8 / 4), (2, 4 + 12 / 4), (3, 16 / 4)])
def test_model_states_per_zero_stage(zero, per_param):
    parts, params = _states(zero, 4)
    states = parts["parameters"] + parts["gradients"] + parts["optimizer"]
    layer = (64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128) + 2 * 64  # one layer's parameters
    assert states == pytest.approx(params * per_param)
    # reduced once per step: over 8 micro-batches ZeRO-2/3 hold the full local gradients until then
    assert parts.get("gradient staging", 0) == pytest.approx(4 * params if zero in (2, 3) else 0)
    vocab = 256 * 64  # ZeRO-3: the root unit (the head), the largest unit in use and prefetched, a unit's grads
    assert parts.get("gathered units", 0) == (4 * (vocab + 2 * max(layer, vocab) + layer) if zero == 3 else 0)
    assert parts["master weights"] == 0  # fp32 parameters are the masters


def test_layer_flops_add_up_to_the_mfu_count():
    for name in ("tiny", "tiny-gpt2", "tiny-moe", "llama3-8b", "mixtral-8x7b"):
        m, s = preset(name).with_overrides(vocab_size=300), 512
        per_layer = sum(sum(layer_flops(m, s, m.is_moe_layer(i)).values()) for i in range(m.layers))
        assert 3 * (per_layer + 2 * m.hidden * 300) == pytest.approx(flops_per_token(m, s))
    first_dense = ModelConfig(hidden=64, layers=4, heads=4, num_experts=4, moe_first_dense=1,
                              moe_shared_ffn_hidden=32, vocab_size=300)  # fmt: skip
    per_layer = sum(sum(layer_flops(first_dense, 512, i > 0).values()) for i in range(4))
    assert 3 * (per_layer + 2 * 64 * 300) == pytest.approx(flops_per_token(first_dense, 512))
    q = 64  # tiny's forward per token: QKV + out, attention core over the sequence, SwiGLU
    assert layer_flops(preset("tiny"), 16, False) == {
        "matmul": 2 * 64 * (q + 64) + 2 * q * 64 + 2 * 64 * 128 * 3,
        "attention": 4 * 16 * q,
        "experts": 0.0,
    }


@pytest.mark.parametrize(
    "name, vpp",
    [("1f1b", 1), ("interleaved-1f1b", 2), ("zero-bubble", 1), ("gpipe", 1), ("zb-v", 2), ("dualpipe-v", 2)],
)
def test_pipeline_costs_come_from_the_simulator_and_extrapolate_exactly(name, vpp):
    pp, m = 4, 20
    sim = simulate(build(name, pp=pp, microbatches=m, vpp=vpp))
    cost = pipeline_cost(name, pp, vpp, m)  # simulated at 8 micro-batches, the steady part added
    assert cost.in_flight == max(sim.peak_activations)
    if name in ("zb-v", "dualpipe-v"):  # taken at four rounds: ZB-V's idle time varies within half a micro-batch
        assert cost.idle == pytest.approx(sim.bubble_fraction * sim.makespan / 3, abs=0.5)
        return
    assert cost.idle == pytest.approx(sim.bubble_fraction * sim.makespan / 3)
    assert cost.bubble_fraction == pytest.approx(sim.bubble_fraction)
    assert _simulated(name, pp, vpp, 8, 2.0).in_flight <= cost.in_flight


def test_one_f_one_b_holds_pp_micro_batches_and_its_bubble_is_pp_minus_one():
    cost = pipeline_cost("1f1b", 8, 1, 64)
    assert cost.in_flight == 8 and cost.idle == pytest.approx(7)


def test_hardware_profiles_load_and_unknown_names_list_them(tmp_path):
    assert known_hardware() == ["a100-40gb", "a100-80gb", "b200", "h100-sxm", "h200", "mi300x"]
    for name in known_hardware():
        hw = load_hardware(name)
        assert hw.name == name and hw.memory_gib >= 40 and hw.bf16_tflops >= 312
    assert load_hardware("h100-sxm").bf16_tflops == 989.0 and load_hardware("mi300x").memory_gib == 192.0
    with pytest.raises(TrainerError, match="unknown; known profiles are a100-40gb, a100-80gb, b200"):
        load_hardware("v100")
    mine = tmp_path / "mine.toml"
    mine.write_text('memory_gib = 24\nbf16_tflops = 100\nfp32_tflops = 50\nhbm_gbps = 900\nintra_node_gbps = 32\n'
                    'inter_node_gbps = 12.5\ngpus_per_node = 4\n')  # fmt: skip
    assert load_hardware(str(mine)).name == "mine" and load_hardware(str(mine)).gpus_per_node == 4
    mine.write_text("memory_gib = 24\nflops = 3\n")
    with pytest.raises(TrainerError, match=r"unknown field\(s\) \['flops'\]"):
        load_hardware(str(mine))


def test_shapes_from_hugging_face_config_json(tmp_path):
    for name in ("gpt2", "llama3-8b"):
        got = model_from_hf_config(hf_config(preset(name)))
        assert parameter_count(got) == parameter_count(preset(name))
    mixtral = {"model_type": "mixtral", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000, "num_local_experts": 8,
               "num_experts_per_tok": 2, "max_position_embeddings": 32768}  # fmt: skip
    assert sum(parameter_count(model_from_hf_config(mixtral))) == 46_702_792_704
    qwen = {
        "model_type": "qwen2",
        "max_position_embeddings": 32768,
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    }
    assert sum(parameter_count(model_from_hf_config(qwen))) == 494_032_768  # Qwen2-0.5B, with its QKV biases
    (tmp_path / "config.json").write_text(json.dumps(mixtral))
    from_dir, from_file = resolve_model(str(tmp_path)), resolve_model(str(tmp_path / "config.json"))
    assert from_dir == from_file and parameter_count(from_dir) == parameter_count(preset("mixtral-8x7b"))
    with pytest.raises(TrainerError, match="model_type='t5'"):
        model_from_hf_config({"model_type": "t5"})


def test_a_model_that_fits_one_gpu_gets_data_parallelism_only():
    # with only 8 sequences per GPU on 64 GPUs, TP=2 halves the exposed gradient all-reduce and wins
    for gpus, batch in ((1, 8), (8, 512), (64, 4096)):
        (best,) = plan(preset("gpt2"), Cluster(gpus), seq_len=1024, global_batch=batch, top=1)
        assert (best.layout.tp, best.layout.pp, best.layout.cp) == (1, 1, 1) and best.layout.dp == gpus


MODELS = st.builds(
    lambda heads, kv, width, layers, experts, vocab: ModelConfig(
        hidden=heads * width, layers=layers, heads=heads, kv_heads=kv, vocab_size=vocab, max_seq_len=8192,
        num_experts=experts, moe_topk=min(2, experts) if experts else 2,
    ),
    st.sampled_from([8, 16, 32, 64]), st.sampled_from([1, 2, 4, 8]), st.sampled_from([64, 128]),
    st.sampled_from([2, 6, 12, 24, 32, 48, 80]), st.sampled_from([0, 0, 4, 8]), st.sampled_from([32000, 50257]),
)  # fmt: skip


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    model=MODELS,
    gpus=st.sampled_from([1, 2, 8, 16, 24, 64]),
    hardware=st.sampled_from(["a100-40gb", "h100-sxm", "mi300x"]),
    seq_len=st.sampled_from([512, 2048, 8192]),
    batch=st.sampled_from([8, 48, 256]),
)
def test_search_never_proposes_a_layout_check_run_refuses(model, gpus, hardware, seq_len, batch):
    if model.kv_heads and model.heads % model.kv_heads:
        return
    cluster = Cluster(gpus, hardware)
    for found in plan(model, cluster, seq_len=seq_len, global_batch=batch, top=3):
        assert check_run(found.layout.run_config(found.work), gpus).microbatches == found.microbatches
        assert found.fits
        again = evaluate(found.work, found.layout, cluster.profile)  # evaluate mode agrees with the search
        assert again.to_dict() == found.to_dict()


def test_evaluate_of_a_layout_that_does_not_fit_says_so():
    work = Workload(preset("llama3-70b"), 4096, 64)
    result = estimate(work, Layout(world=8, tp=8, sequence_parallel=True), load_hardware("h100-sxm"))
    assert not result.fits and result.memory.total > 16 * 70e9 / 8


def test_deepseek_v3_moe_parameter_count_equals_transformers():
    """Dense first layer, MoE after (moe_first_dense), MLA, shared expert: the count of transformers' model."""
    transformers = pytest.importorskip("transformers")
    config = transformers.DeepseekV3Config(
        hidden_size=48, num_hidden_layers=3, first_k_dense_replace=1, vocab_size=101, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
        n_shared_experts=2, n_group=2, topk_group=1,
    )  # fmt: skip
    model = model_from_hf_config(config.to_dict())
    dense, expert = parameter_count(model)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    assert dense + expert == sum(p.numel() for p in hf.parameters())
    assert expert == 2 * 8 * 3 * 48 * 16  # two MoE layers of 8 experts

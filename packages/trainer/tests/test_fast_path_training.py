"""Training on the fast paths. fp8 on the torch backend (torchao's float8 matmuls in the transformer
layers' linear layers) runs on CPUs: it learns, tracks bf16, splits over TP with sequence parallelism,
and resumes from its checkpoints with the same losses. The CUDA variants (NCCL against gloo, the
Transformer Engine backend against the torch one, TE's fp8 recipes) run where a GPU is (markers ``cuda``
and ``te``; the GPU validation script runs them) and are skipped elsewhere.

Tolerance against bf16 and across layouts: rtol 1e-2 per step. e4m3 keeps 3 mantissa bits (rounding
error up to 6% of an element, about 2% rms); a matmul output averages it over its 64 to 128 terms and
the loss over all tokens, which leaves some 1e-3 (measured: 6e-4 on this model); with TP each rank scales
its own weight shard (its own amax), so the rounding differs from the one-process run by the same order.
A missing reduction or a wrong scale moves the loss by far more (tens of percent)."""

from importlib.util import find_spec

import pytest

from trainer.config import load_run_config
from trainer.train.loop import train

needs_torchao = pytest.mark.skipif(find_spec("torchao") is None, reason="needs torchao (trainer[fp8])")

STEPS, K = 6, 3


def losses(overrides: dict, tmp: str) -> list[float]:
    base = {
        "model": {"preset": "tiny"},
        "train": {"steps": STEPS, "seq_len": 32, "micro_batch": 2, "global_batch": 4, "seed": 5},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1},
        "data": {"cache_dir": tmp},
    }
    for section, values in overrides.items():
        base.setdefault(section, {}).update(values)
    return [r["loss"] for r in train(load_run_config(overrides=base))]


def convert_tiny_to_fp8() -> tuple[int, bool, bool]:
    """(layers converted, names unchanged, the same parameter objects) for the tiny model in one process."""
    import pstate
    from trainer.model import ModelGroups, apply_backend, build_chunks, model_shards, preset
    from trainer.model.float8 import Float8Matmul

    with pstate.initialize(pstate.ParallelConfig()) as ps:
        groups = ModelGroups.from_state(ps)
        chunks = build_chunks(preset("tiny").with_overrides(vocab_size=64), groups, pp_rank=0, pp=1, seed=0)
        before = dict(chunks[0].named_parameters())
        names = sorted(model_shards(chunks))
        apply_backend(chunks, groups, backend="torch", precision="fp8", fp8_recipe="current")
        after = dict(chunks[0].named_parameters())
        converted = sum(isinstance(getattr(m, "local_matmul", None), Float8Matmul) for m in chunks[0].modules())
        same = all(after[n] is p for n, p in before.items()) and len(after) == len(before)
        return converted, sorted(model_shards(chunks)) == names, same


@needs_torchao
def test_fp8_converts_the_four_linear_layers_of_each_block_and_keeps_the_names(run_ranks):
    converted, names_kept, same_parameters = run_ranks(1, convert_tiny_to_fp8)[0]
    assert converted == 4 * 4 and names_kept and same_parameters  # tiny: 4 layers x (qkv, proj, fc1, fc2)


@needs_torchao
def test_fp8_learns_and_tracks_bf16(run_ranks, tmp_path):
    bf16 = run_ranks(1, losses, {"train": {"precision": "bf16"}}, str(tmp_path))[0]
    fp8 = run_ranks(1, losses, {"train": {"precision": "fp8"}}, str(tmp_path))[0]
    assert fp8[-1] < fp8[0] - 0.5
    assert fp8 == pytest.approx(bf16, rel=1e-2)
    assert fp8 != bf16  # the fp8 matmuls ran: their rounding is not bf16's


@needs_torchao
def test_fp8_at_tp2_with_sequence_parallelism_matches_one_process(run_ranks, tmp_path):
    fp8 = {"train": {"precision": "fp8"}}
    reference = run_ranks(1, losses, fp8, str(tmp_path))[0]
    split = {"train": {"precision": "fp8", "sequence_parallel": True}, "parallel": {"tp": 2}}
    for rank_losses in run_ranks(2, losses, split, str(tmp_path)):
        assert rank_losses == pytest.approx(reference, rel=1e-2)


@needs_torchao
def test_fp8_resumes_from_its_checkpoint_with_the_same_losses(run_ranks, tmp_path):
    """Current scaling keeps no state: the checkpoint is bf16's, and the resumed run repeats the
    uninterrupted one (rtol 2e-5, as for fp32 resumption: the same computation in the same order)."""
    cache, save = str(tmp_path / "cache"), str(tmp_path / "ckpt")
    full = run_ranks(1, losses, {"train": {"precision": "fp8"}}, cache)[0]
    head = run_ranks(1, losses, {"train": {"precision": "fp8", "save": save, "exit_interval": K}}, cache)[0]
    tail = run_ranks(1, losses, {"train": {"precision": "fp8", "save": save, "load": save}}, cache)[0]
    assert len(head) == K and head + tail == pytest.approx(full, rel=2e-5)


@pytest.mark.cuda
def test_training_on_a_gpu_with_nccl_matches_the_cpu_run(run_ranks, tmp_path):
    """fp32 on one GPU (NCCL) against one CPU process (gloo). Tolerance rtol 1e-3: other matmul kernels
    and reduction orders (TF32 stays off for fp32), carried through six AdamW steps."""
    cpu = run_ranks(1, losses, {}, str(tmp_path))[0]
    gpu = run_ranks(1, losses, {}, str(tmp_path), device="cuda")[0]
    assert gpu == pytest.approx(cpu, rel=1e-3)


@pytest.mark.cuda(gpus=2)
def test_tp2_on_nccl_matches_one_gpu(run_ranks, tmp_path):
    """TP2 with sequence parallelism over NCCL against one GPU, fp32 (rtol 1e-4: the split reorders sums)."""
    one = run_ranks(1, losses, {}, str(tmp_path), device="cuda")[0]
    split = {"train": {"sequence_parallel": True}, "parallel": {"tp": 2}}
    for rank_losses in run_ranks(2, losses, split, str(tmp_path), device="cuda"):
        assert rank_losses == pytest.approx(one, rel=1e-4)


@pytest.mark.cuda
@needs_torchao
def test_torchao_fp8_on_a_gpu_tracks_bf16(run_ranks, tmp_path):
    bf16 = run_ranks(1, losses, {"train": {"precision": "bf16"}}, str(tmp_path), device="cuda")[0]
    fp8 = run_ranks(1, losses, {"train": {"precision": "fp8"}}, str(tmp_path), device="cuda")[0]
    assert fp8 == pytest.approx(bf16, rel=1e-2) and fp8[-1] < fp8[0] - 0.5


@pytest.mark.te
def test_te_backend_matches_the_torch_backend(run_ranks, tmp_path):
    """bf16 with Transformer Engine's layers against the torch layers on one GPU (rtol 2e-2, as for bf16
    across layouts: other kernels round differently)."""
    torch_run = run_ranks(1, losses, {"train": {"precision": "bf16"}}, str(tmp_path), device="cuda")[0]
    te = {"train": {"precision": "bf16"}, "model": {"preset": "tiny", "backend": "te"}}
    assert run_ranks(1, losses, te, str(tmp_path), device="cuda")[0] == pytest.approx(torch_run, rel=2e-2)


@pytest.mark.te
@pytest.mark.parametrize("recipe", ["current", "delayed"])
def test_te_fp8_recipes_learn_and_track_bf16(run_ranks, tmp_path, recipe):
    bf16 = run_ranks(1, losses, {"train": {"precision": "bf16"}}, str(tmp_path), device="cuda")[0]
    fp8 = {"train": {"precision": "fp8", "fp8_recipe": recipe}, "model": {"preset": "tiny", "backend": "te"}}
    got = run_ranks(1, losses, fp8, str(tmp_path), device="cuda")[0]
    assert got == pytest.approx(bf16, rel=2e-2) and got[-1] < got[0] - 0.5

"""The optional fast paths are refused before any rank starts, in one line naming the field, the value and
what is missing, where their package (or a GPU) is absent; the default torch backend is unchanged."""

from importlib.util import find_spec

import pytest
import torch

from trainer.config import check_run, load_run_config
from trainer.errors import TrainerError
from trainer.model import preset


def refusal(overrides: dict) -> str:
    with pytest.raises(TrainerError) as error:
        check_run(load_run_config(overrides=overrides), 1)
    return str(error.value)


@pytest.mark.skipif(find_spec("transformer_engine") is not None, reason="Transformer Engine is installed here")
def test_te_backend_is_refused_without_transformer_engine():
    assert refusal({"model": {"backend": "te"}}) == (
        "model.backend='te': needs the transformer_engine package (Transformer Engine), which is not installed"
    )


@pytest.mark.skipif(find_spec("deep_ep") is not None, reason="deep_ep is installed here")
def test_flex_dispatcher_is_refused_without_deep_ep():
    overrides = {"model": {"preset": "tiny-moe", "moe_dispatcher": "flex"}}
    assert refusal(overrides) == (
        "model.moe_dispatcher='flex': needs the deep_ep package (DeepEP), which is not installed"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_te_backend_needs_a_gpu_where_the_package_is_there():
    if find_spec("transformer_engine") is None:
        pytest.skip("Transformer Engine is not installed: refused for that first")
    assert refusal({"model": {"backend": "te"}}) == "model.backend='te': needs a CUDA GPU, none is visible"


def test_fp8_choices_the_torch_backend_cannot_run_are_refused():
    assert refusal({"train": {"precision": "fp8", "fp8_recipe": "delayed"}}).startswith(
        "train.fp8_recipe='delayed': model.backend='torch' (torchao) scales by the current amax only"
    )
    assert refusal({"train": {"precision": "fp8", "zero": 3}}) == (
        "train.precision='fp8' with --zero 3 is not supported yet; use --zero 0, 1 or 2"
    )
    with pytest.raises(TrainerError, match=r"train.fp8_recipe='mx': must be one of \('current', 'delayed', 'mxfp8'\)"):
        load_run_config(overrides={"train": {"fp8_recipe": "mx"}})
    with pytest.raises(TrainerError, match=r"model.backend='jax': must be one of \('torch', 'te'\)"):
        load_run_config(overrides={"model": {"backend": "jax"}})


def test_te_backend_combinations_it_cannot_run_are_refused_before_its_package_is_looked_for():
    assert refusal({"model": {"backend": "te"}, "train": {"zero": 3}}) == (
        "model.backend='te' with --zero 3 is not supported yet; use --zero 0, 1 or 2"
    )
    assert refusal({"model": {"preset": "tiny-mla", "backend": "te"}}) == (
        "model.backend='te' with model.attention='mla' is not supported yet"
    )
    assert refusal({"model": {"preset": "tiny-hybrid", "backend": "te"}}) == (
        "model.backend='te' with a hybrid model.layer_pattern is not supported yet"
    )
    assert refusal({"model": {"backend": "te"}, "data": {"packing": "pack"}}).startswith(
        "model.backend='te' with data.packing='pack' is not supported yet"
    )


def test_the_torch_backend_is_the_default_and_checks_clean():
    cfg = load_run_config(overrides={"train": {"precision": "bf16"}})
    assert cfg.model.backend == "torch" and preset("tiny").backend == "torch"
    assert check_run(cfg, 1).microbatches == 1


@pytest.mark.skipif(find_spec("transformer_engine") is not None, reason="Transformer Engine is installed here")
def test_the_cli_refuses_te_with_exit_2(capsys):
    from trainer.cli import main

    assert main(["train", "--set", "model.backend=te", "--steps", "1"]) == 2
    assert "error: model.backend='te': needs the transformer_engine package" in capsys.readouterr().err

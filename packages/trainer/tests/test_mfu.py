"""MFU: model FLOPs (and, with recomputation, hardware FLOPs) per step over the device's peak for the
training precision, from the planner's hardware profiles on known GPUs, ``train.peak_tflops`` when set,
and a measured matmul (labelled so) on CPUs."""

import re

import pytest
import torch

from trainer.config import load_run_config
from trainer.config.inputs import model_vocab
from trainer.data import build_datasets
from trainer.errors import TrainerError
from trainer.model import preset
from trainer.plan import load_hardware
from trainer.train.flops import flops_per_token
from trainer.train.loop import train
from trainer.train.peak import device_peak, match_hardware


@pytest.mark.parametrize(
    "device_name, profile, precision, tflops",
    [
        ("NVIDIA H100 80GB HBM3", "h100-sxm", "bf16", 989.0),
        ("NVIDIA H100 80GB HBM3", "h100-sxm", "fp8", 1979.0),
        ("NVIDIA H200", "h200", "bf16", 989.0),
        ("NVIDIA B200", "b200", "fp8", 4500.0),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb", "bf16", 312.0),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb", "fp8", 312.0),  # no FP8 units: fp8 runs at the bf16 rate
        ("NVIDIA A100-SXM4-40GB", "a100-40gb", "fp32", 156.0),  # fp32 on TF32 units
        ("AMD Instinct MI300X", "mi300x", "fp16", 1307.0),
    ],
)
def test_a_gpu_name_finds_its_datasheet_peak_for_the_precision(device_name, profile, precision, tflops):
    hw = match_hardware(device_name)
    assert hw is not None and hw.name == profile
    assert hw.peak_flops(precision) == tflops * 1e12


def test_an_unknown_gpu_has_no_profile():
    assert match_hardware("NVIDIA GeForce RTX 4090") is None
    assert match_hardware("NVIDIA H100 PCIe") is None  # not the SXM part: another peak


def test_the_profiles_are_the_planners_table():
    assert match_hardware("NVIDIA H100 80GB HBM3") == load_hardware("h100-sxm")


def test_the_override_wins_and_the_cpu_falls_back_to_a_labelled_measurement():
    peak = device_peak(torch.device("cpu"), "bf16", 123.0)
    assert (peak.flops, peak.source) == (123.0e12, "override")
    measured = device_peak(torch.device("cpu"), "fp32")
    assert measured.source == "measured" and measured.flops > 0
    assert re.search(r"measured: CPU: (128|256|512|1024)\^3 float32 matmul", measured.describe())


def test_peak_tflops_is_validated():
    with pytest.raises(TrainerError, match=r"train.peak_tflops=0: must be a finite number > 0"):
        load_run_config(overrides={"train": {"peak_tflops": 0}})
    with pytest.raises(TrainerError, match=r"train.peak_tflops='x': must be"):
        load_run_config(overrides={"train": {"peak_tflops": "x"}})


def test_recomputation_adds_the_repeated_forward_to_the_hardware_count():
    cfg, s = preset("tiny").with_overrides(vocab_size=300), 32
    model = flops_per_token(cfg, s)
    head = 2 * cfg.hidden * 300
    assert flops_per_token(cfg, s, "full") == pytest.approx(model + (model / 3 - head))
    q = cfg.heads * cfg.head_dim
    assert flops_per_token(cfg, s, "selective") == model + 4 * s * q * cfg.layers


def train_records(tmp: str, train_overrides: dict) -> tuple[list[dict], float, float]:
    """The run's records, and its model's FLOPs per token without and with full recomputation."""
    overrides = {
        "model": {"preset": "tiny"},
        "train": {"steps": 2, "seq_len": 16, "micro_batch": 2, **train_overrides},
        "data": {"cache_dir": tmp},
    }
    cfg = load_run_config(overrides=overrides)
    datasets = build_datasets(cfg.data, seq_len=16, seed=cfg.train.seed)
    model = model_vocab(cfg.model, datasets.tokenizer, list(datasets.sources))
    return train(cfg), flops_per_token(model, 16), flops_per_token(model, 16, "full")


def test_the_loop_reports_mfu_and_hfu_over_the_stated_peak(run_ranks, tmp_path):
    (result,) = run_ranks(1, train_records, str(tmp_path), {"peak_tflops": 0.5, "recompute": "full"})
    records, model_flops, hardware_flops = result
    r, tokens_per_step = records[-1], records[0]["tokens"]
    assert r["mfu_peak"] == "override"
    assert r["mfu"] == pytest.approx(model_flops * tokens_per_step / r["step_time_s"] / 0.5e12, rel=1e-9)
    assert r["hfu"] == pytest.approx(hardware_flops * tokens_per_step / r["step_time_s"] / 0.5e12, rel=1e-9)

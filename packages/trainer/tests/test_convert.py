"""``trainer convert``: a checkpoint saved at TP2 exported to Hugging Face's format gives the same
logits in ``transformers`` (GPT-2 and Llama shapes) as our model; importing it back and exporting again
gives the same tensors; a weights-only import starts a new run.

Tolerance: rtol/atol 1e-4 on fp32 logits: the two implementations order their sums differently
(fused vs separate projections, SDPA kernels), which moves the last bits; a wrong name, transpose,
rotary convention or activation is off by O(1).
"""

import pytest
import torch
from safetensors.torch import load_file

from trainer.config import load_run_config
from trainer.convert import export_to_hf, import_from_hf
from trainer.model import ModelGroups, build_chunks, model_shards
from trainer.train.loop import train

transformers = pytest.importorskip("transformers")


def train_and_save(model: str, save: str, cache: str) -> None:
    overrides = {
        "model": {"preset": model},
        "parallel": {"tp": 2},
        "train": {"steps": 3, "seq_len": 32, "micro_batch": 2, "global_batch": 4, "save": save},
        "data": {"cache_dir": cache},
    }
    train(load_run_config(overrides=overrides))


def our_logits(save: str, ids: torch.Tensor) -> torch.Tensor:
    """The saved model's logits, rebuilt in one process (as generate does)."""
    import ckpt
    import pstate
    from trainer.config import parse_run_config

    found = ckpt.latest(save)
    cfg = parse_run_config(ckpt.load({"config": ""}, found)["config"])
    model = cfg.model.with_overrides(vocab_size=257)
    with pstate.initialize(pstate.ParallelConfig()) as ps:
        (chunk,) = build_chunks(model, ModelGroups.from_state(ps), pp_rank=0, pp=1, seed=cfg.train.seed)
        ckpt.load({"model": model_shards([chunk])}, found)
        with torch.no_grad():
            return chunk(ids)[:, :, :257].transpose(0, 1)  # [batch, seq, vocab]


def train_from(model: str, load: str, cache: str) -> list[int]:
    overrides = {
        "model": {"preset": model},
        "parallel": {"pp": 2},
        "train": {"steps": 2, "seq_len": 32, "micro_batch": 2, "global_batch": 4, "load": load},
        "data": {"cache_dir": cache},
    }
    return [r["step"] for r in train(load_run_config(overrides=overrides))]


def export(save: str, out: str) -> str:
    return str(export_to_hf(save, out))


def reimport(hf: str, save: str) -> str:
    return str(import_from_hf(hf, save))


@pytest.mark.parametrize("model", ["tiny", "tiny-gpt2"])
def test_exported_model_gives_our_logits_in_transformers(run_ranks, tmp_path, model):
    save, hf = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    run_ranks(2, train_and_save, model, save, str(tmp_path / "cache"))
    run_ranks(1, export, save, hf)
    ids = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))
    ours = run_ranks(1, our_logits, save, ids)[0]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = theirs(ids).logits
    torch.testing.assert_close(logits, ours, rtol=1e-4, atol=1e-4)

    again = str(tmp_path / "again")
    run_ranks(1, reimport, hf, str(tmp_path / "imported"))
    run_ranks(1, export, str(tmp_path / "imported"), again)
    first, second = load_file(f"{hf}/model.safetensors"), load_file(f"{again}/model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    # the weights-only import starts a new run (step 1), here at another layout
    assert run_ranks(2, train_from, model, str(tmp_path / "imported"), str(tmp_path / "cache"))[0] == [1, 2]

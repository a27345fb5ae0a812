"""The engine against ``transformers``' ``generate`` on the model exported with ``trainer convert``: a batch
of mixed-length prompts (left-padded for transformers, packed for us) gives identical greedy tokens, for
the Llama shape (rotary, GQA, SwiGLU) and the GPT-2 shape (learned positions, tied)."""

import pytest
import torch

from trainer.convert import export_to_hf
from trainer.infer import Request, SamplingParams, engine_for, inference_state, load_chunk
from trainer.infer.testing import prompts, save_checkpoint

transformers = pytest.importorskip("transformers")
NEW = 16


def ours(path: str, ids: list[list[int]]) -> list[list[int]]:
    with inference_state(1) as ps:
        chunk, _, tokenizer = load_chunk(path, ps)
        _, engine = engine_for(chunk, tokenizer, block_size=8, num_blocks=64)
        params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
        return [c.token_ids for c in engine.generate([Request(p, params) for p in ids])]


def export(path: str, out: str) -> str:
    return str(export_to_hf(path, out))


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
def test_greedy_tokens_equal_transformers_generate(run_ranks, tmp_path, name):
    path = str(tmp_path / "ckpt")
    run_ranks(1, save_checkpoint, path, 1, name)
    (hf_dir,) = run_ranks(1, export, path, str(tmp_path / "hf"))
    ids = prompts((5, 23, 1, 12), vocab=256)
    (expected,) = run_ranks(1, ours, path, ids)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    width = max(map(len, ids))
    padded = torch.tensor([[0] * (width - len(p)) + p for p in ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=padded, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
            pad_token_id=0,
        )  # fmt: skip
    assert out[:, width:].tolist() == expected
    assert len({tuple(t) for t in expected}) == len(ids)

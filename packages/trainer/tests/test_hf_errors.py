"""Bad Hugging Face folders are refused with one line naming the file and the key, and nothing is written
to the destination: no config.json, no weights, a tensor of the wrong shape, a tensor the model has no
place for, a missing tensor, a truncated safetensors file, a tokenizer larger than the vocabulary."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def tiny_llama(path) -> None:
    config = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
        vocab_size=40, max_position_embeddings=32,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(path)


def import_error(hf: str, save: str) -> str:
    from trainer.convert import import_from_hf
    from trainer.errors import TrainerError

    try:
        import_from_hf(hf, save)
    except TrainerError as error:
        return str(error)
    return "no error"


def rewrite(path, change) -> None:
    state = load_file(str(path / "model.safetensors"))
    change(state)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def _wrong_shape(state):
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)


def _integer(state):
    state["model.norm.weight"] = torch.ones(32, dtype=torch.int64)


def _extra(state):
    state["model.layers.0.self_attn.rotary_scale"] = torch.zeros(4)


def _missing(state):
    del state["model.layers.0.mlp.up_proj.weight"]


def _big_tokenizer(path) -> None:
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(50)}, unk_token="w0"))
    tok.save(str(path / "tokenizer.json"))


CASES = {
    "no config": (lambda p: (p / "config.json").unlink(), "config.json is missing"),
    "no weights": (lambda p: (p / "model.safetensors").unlink(), "neither model.safetensors.index.json nor"),
    "wrong shape": (lambda p: rewrite(p, _wrong_shape), "k_proj.weight has shape (8, 32), expected (16, 32)"),
    "wrong dtype": (lambda p: rewrite(p, _integer), "model.norm.weight has dtype I64, expected one of"),
    "extra tensor": (lambda p: rewrite(p, _extra), "rotary_scale'] have no place in the llama model"),
    "missing tensor": (lambda p: rewrite(p, _missing), "tensor 'model.layers.0.mlp.up_proj.weight' is missing"),
    "truncated": (
        lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:2000]),
        "not a readable safetensors file",
    ),
    "unknown key": (
        lambda p: (p / "config.json").write_text(json.dumps({**json.loads((p / "config.json").read_text()), "foo": 1})),
        "config.json foo=1: not understood",
    ),
    "tokenizer too large": (_big_tokenizer, "its 50 ids exceed config.json vocab_size=40"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_folders_are_refused_by_name_and_nothing_is_written(run_ranks, tmp_path, case):
    damage, message = CASES[case]
    hf = tmp_path / "hf"
    tiny_llama(hf)
    damage(hf)
    (error,) = run_ranks(1, import_error, str(hf), str(tmp_path / "out"))
    assert message in error
    assert not (tmp_path / "out").exists()

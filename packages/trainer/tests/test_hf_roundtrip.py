"""Convert, train, export, serve as one path: a Hugging Face Llama with its own ``tokenizer.json`` (built
with ``tokenizers``, smaller than the model's vocabulary) is imported; ``trainer train --load`` takes
the model and tokenizer from the checkpoint (a different model given is refused naming both); after
training the export is a complete folder (sharded weights with an index, config, generation config,
tokenizer) that ``transformers`` loads, and its greedy generation equals ours token for token.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCAB = 96
TEXT = ["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs"] * 20


def make_hf(path) -> None:
    """A tiny tied Llama with llama3 rope and head_dim != hidden/heads, and a word-level tokenizer."""
    config = transformers.LlamaConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=True,
        initializer_range=0.2, eos_token_id=1,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()
    trainer = tokenizers.trainers.WordLevelTrainer(special_tokens=["<unk>", "</s>"])
    tok.train_from_iterator(TEXT, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "unk_token": "<unk>"}))


def import_dir(hf: str, save: str) -> None:
    from trainer.convert import import_from_hf

    import_from_hf(hf, save)


def train_from(start: dict, save: str | None, cache: str) -> list[tuple[int, float]]:
    """``start``: ``{"load": CKPT}`` or ``{"init_from_hf": DIR}``."""
    from trainer.config import load_run_config
    from trainer.convert import with_checkpoint_model
    from trainer.train.loop import train

    overrides = {
        "parallel": {"tp": 2},
        "train": {"steps": 3, "seq_len": 16, "micro_batch": 2, "global_batch": 4, "save": save, **start},
        "data": {"cache_dir": cache},  # the embedded corpus, in the imported tokenizer's ids
    }
    cfg = with_checkpoint_model(load_run_config(overrides=overrides), explicit_model=False)
    return [(r["step"], r["loss"]) for r in train(cfg)]


def export_and_generate(save: str, out: str, prompt: list[int], max_shard_bytes: int) -> list[int]:
    import ckpt
    import pstate
    from trainer.config import parse_run_config
    from trainer.convert import export_to_hf
    from trainer.data import load_tokenizer
    from trainer.generate import decode
    from trainer.model import ModelGroups, build_chunks, model_shards

    export_to_hf(save, out, max_shard_bytes=max_shard_bytes)
    found = ckpt.latest(save)
    cfg = parse_run_config(ckpt.load({"config": ""}, found)["config"])
    with pstate.initialize(pstate.ParallelConfig()) as ps:
        (chunk,) = build_chunks(cfg.model, ModelGroups.from_state(ps), pp_rank=0, pp=1, seed=0)
        ckpt.load({"model": model_shards([chunk])}, found)
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        return decode(
            chunk.eval(), prompt, max_new_tokens=12, temperature=0.0, top_k=None,
            generator=torch.Generator(), vocab_limit=tokenizer.vocab_size,
        )  # fmt: skip


def test_convert_train_export_serve(run_ranks, tmp_path):
    from trainer.config import load_run_config
    from trainer.convert import with_checkpoint_model
    from trainer.errors import TrainerError

    hf, imported, trained, out = (str(tmp_path / n) for n in ("hf", "imported", "trained", "out"))
    make_hf(tmp_path / "hf")
    run_ranks(1, import_dir, hf, imported)

    # --load takes the model and the tokenizer from the checkpoint; a conflicting --model is refused
    cfg = with_checkpoint_model(load_run_config(overrides={"train": {"load": imported}}), explicit_model=False)
    assert (cfg.model.vocab_size, cfg.model.head_dim, cfg.model.rope_type) == (VOCAB, 16, "llama3")
    assert cfg.data.tokenizer.endswith("tokenizer.json")
    given = load_run_config(overrides={"model": {"preset": "tiny"}, "train": {"load": imported}})
    with pytest.raises(TrainerError, match=r"checkpoint's model differs .*hidden=48 vs 64"):
        with_checkpoint_model(given, explicit_model=True)

    records = run_ranks(2, train_from, {"load": imported}, trained, str(tmp_path / "cache"))[0]
    assert [step for step, _ in records] == [1, 2, 3]
    # starting from the Hugging Face folder directly (each rank reads its slices) trains identically
    assert run_ranks(2, train_from, {"init_from_hf": hf}, None, str(tmp_path / "cache"))[0] == records
    prompt = [5, 7, 9, 4]
    (ours,) = run_ranks(1, export_and_generate, trained, out, prompt, 40_000)

    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # split past the size limit, as transformers does
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).is_file(), name
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("the lazy dog", add_special_tokens=False)["input_ids"] == [
        tokenizer.convert_tokens_to_ids(w) for w in ("the", "lazy", "dog")
    ]
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    vocab = len(tokenizer)
    assert vocab < VOCAB  # the model's vocabulary is larger than the tokenizer's
    with torch.no_grad():
        theirs = model.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
            suppress_tokens=list(range(vocab, VOCAB)), pad_token_id=0,
        )[0, len(prompt) :].tolist()  # fmt: skip
    assert ours[: len(theirs)] == theirs


def test_train_load_with_a_different_model_is_refused_on_the_command_line(run_ranks, tmp_path):
    import subprocess
    import sys

    make_hf(tmp_path / "hf")
    run_ranks(1, import_dir, str(tmp_path / "hf"), str(tmp_path / "imported"))
    command = [sys.executable, "-m", "trainer", "train", "--load", str(tmp_path / "imported"), "--print-config"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "hidden = 48" in done.stdout and 'rope_type = "llama3"' in done.stdout
    done = subprocess.run([*command, "--model", "tiny"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "checkpoint's model differs" in done.stderr, done.stderr

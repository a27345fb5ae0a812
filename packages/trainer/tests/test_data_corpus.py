"""The embedded default corpus and ``build_datasets``: real stdlib text, deterministic, cached, split and blended."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest

from trainer.data.build import DataConfig, build_datasets
from trainer.data.corpus import MODULES, corpus_files, default_corpus, stdlib_root
from trainer.data.errors import DataError
from trainer.data.preprocess import preprocess
from trainer.data.testing import train_hf_tokenizer, write_jsonl
from trainer.data.tokenizer import ByteTokenizer, load_tokenizer


def test_default_corpus_is_the_stdlib_modules_one_document_each(tmp_path):
    tok = ByteTokenizer()
    ds = default_corpus(tmp_path, tok)
    files = corpus_files()
    assert len(files) == len(MODULES) == len(ds) and ds.num_tokens > 500_000
    for i, f in enumerate(files):
        assert ds[i].tolist() == [*f.read_bytes(), tok.eos_id]
    assert ds.meta["sources"][:2] == ["argparse.py", "textwrap.py"] and "json/__init__.py" in ds.meta["sources"]
    assert tok.decode(ds[0]).startswith(files[0].read_text(encoding="utf-8")[:200])


def test_default_corpus_is_cached_deterministic_and_keyed_by_content(tmp_path):
    tok = ByteTokenizer()
    first = default_corpus(tmp_path / "a", tok)
    again = default_corpus(tmp_path / "a", tok)
    assert again.bin_path == first.bin_path and again.bin_path.stat().st_mtime_ns == first.bin_path.stat().st_mtime_ns
    elsewhere = default_corpus(tmp_path / "b", tok)
    assert elsewhere.bin_path.name == first.bin_path.name
    assert elsewhere.bin_path.read_bytes() == first.bin_path.read_bytes()
    assert elsewhere.idx_path.read_bytes() == first.idx_path.read_bytes()
    # a different copy of the standard library (one module edited) gets its own entry
    fake = tmp_path / "stdlib"
    for f in corpus_files():
        target = fake / f.relative_to(stdlib_root())
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
    (fake / "textwrap.py").write_text("# edited\n")
    edited = default_corpus(tmp_path / "a", tok, stdlib=fake)
    assert edited.bin_path != first.bin_path and edited[1].tolist() == [*b"# edited\n", tok.eos_id]
    for f in list(fake.glob("*.py"))[:-5]:
        f.unlink()
    with pytest.raises(DataError, match=r"has only \d+ of the 47 modules of the default corpus"):
        default_corpus(tmp_path / "a", tok, stdlib=fake)


def test_building_the_cache_is_announced_once(tmp_path):
    """The first use says what it builds and where, and how long it took; a cached corpus says nothing."""
    heard: list[str] = []
    data = build_datasets(DataConfig(cache_dir=str(tmp_path)), seq_len=64, seed=0, log=heard.append)
    prefix = data.sources[0].prefix
    assert len(heard) == 2
    assert heard[0].startswith(f"data: building the default corpus cache {prefix} ({len(MODULES)} files, ")
    assert heard[1].startswith(f"data: built {data.sources[0].num_tokens:,} tokens in ")
    build_datasets(DataConfig(cache_dir=str(tmp_path)), seq_len=64, seed=0, log=heard.append)
    assert len(heard) == 2


def test_concurrent_builders_agree(tmp_path):
    results = [None] * 4

    def build(i):
        results[i] = default_corpus(tmp_path, ByteTokenizer())

    threads = [threading.Thread(target=build, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.bin_path for r in results}) == 1
    assert all(np.array_equal(r.tokens, results[0].tokens) for r in results)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        results[0].bin_path.name,
        results[0].idx_path.name,
    ]


def test_build_datasets_default_corpus_split_by_document(tmp_path):
    data = build_datasets(DataConfig(cache_dir=str(tmp_path), valid_fraction=0.1), seq_len=64, seed=0)
    assert data.tokenizer.name == "byte"
    assert len(data.valid.documents) == round(0.1 * len(MODULES))
    assert not set(data.train.documents) & set(data.valid.documents)
    assert data.train[0].shape == (65,)
    again = build_datasets(DataConfig(cache_dir=str(tmp_path), valid_fraction=0.1), seq_len=64, seed=1)
    assert np.array_equal(again.valid.batch(range(5)), data.valid.batch(range(5)))  # valid ignores the train seed
    assert not np.array_equal(again.train.batch(range(5)), data.train.batch(range(5)))
    none = build_datasets(DataConfig(cache_dir=str(tmp_path), valid_fraction=0), seq_len=64, seed=0)
    assert none.valid is None


def test_build_datasets_blends_preprocessed_data_and_checks_the_tokenizer(tmp_path):
    tok = load_tokenizer(train_hf_tokenizer(tmp_path / "tok"))
    prefixes = []
    for i in range(2):
        texts = [f"document {j} of set {i}: " + "the quick brown fox " * (j % 5 + 1) for j in range(30)]
        out = tmp_path / f"set{i}"
        preprocess([write_jsonl(tmp_path / f"{i}.jsonl", texts)], out, tokenizer=tok, append_eos=True, progress=False)
        prefixes.append(str(out))
    config = DataConfig(paths=tuple(prefixes), weights=(0.25, 0.75), tokenizer=str(tmp_path / "tok"))
    data = build_datasets(config, seq_len=16, seed=0)
    assert data.train.counts.tolist() == [1, 3] and data.valid.counts.tolist() == [1, 3]
    assert any(tok.eos_id in data.train[g][1:-1] for g in range(20))  # samples cross document ends
    with pytest.raises(DataError, match=r"set0 was made with tokenizer hf:\w+, this run uses byte"):
        build_datasets(DataConfig(paths=tuple(prefixes)), seq_len=16, seed=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"paths": ("a",), "weights": (1.0, 2.0)}, "weights has 2 entries but paths has 1"),
        ({"paths": ("a", "b"), "weights": (1.0, -1.0)}, "must be positive"),
        ({"valid_fraction": 1.0}, r"valid_fraction=1.0 must be in \[0, 1\)"),
    ],
)
def test_data_config_is_validated(kwargs, message):
    with pytest.raises(DataError, match=message):
        DataConfig(**kwargs)

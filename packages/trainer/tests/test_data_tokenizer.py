"""Tokenizers: the byte tokenizer and Hugging Face tokenizer.json files (one trained here, no network).

Exact checks: round trips must give back the very text, and ids must match the ``tokenizers`` library's own.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from trainer.data.errors import DataError
from trainer.data.testing import SENTENCES, train_hf_tokenizer
from trainer.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, encode_documents, load_tokenizer


def test_byte_tokenizer_round_trips_any_unicode_and_has_an_eos():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.eos_id, tok.name) == (257, 256, "byte")
    for text in SENTENCES:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8")) and max(ids) < 256
        assert tok.decode(ids) == text
        assert tok.decode([*ids, tok.eos_id]) == text  # special tokens are skipped
    with pytest.raises(DataError, match="token id 300 is outside"):
        tok.decode([1, 300])


def test_encode_documents_appends_eos_and_drops_empty_documents():
    tok = ByteTokenizer()
    docs = encode_documents(tok, ["ab", "", "é"], append_eos=True, dtype=np.dtype("<u2"))
    assert [d.tolist() for d in docs] == [[97, 98, 256], [0xC3, 0xA9, 256]]
    assert all(d.dtype == np.dtype("<u2") for d in docs)


def test_hf_tokenizer_matches_the_library_and_finds_its_eos(tmp_path):
    from tokenizers import Tokenizer as Library

    path = train_hf_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
    library = Library.from_file(str(path))
    assert tok.vocab_size == library.get_vocab_size() <= 320
    assert tok.eos_id == library.token_to_id("<|endoftext|>")
    for text in SENTENCES:
        ids = tok.encode(text)
        assert ids == library.encode(text).ids
        assert len(ids) < len(text.encode("utf-8"))  # merges were learned
        assert tok.decode(ids) == text
    arrays = encode_documents(tok, SENTENCES, append_eos=True, dtype=np.dtype("<u2"))
    assert [a.tolist() for a in arrays] == [[*library.encode(t).ids, tok.eos_id] for t in SENTENCES]
    assert load_tokenizer(tmp_path / "tok").name == tok.name  # a directory holding tokenizer.json
    assert tok.name != load_tokenizer(train_hf_tokenizer(tmp_path / "other", vocab_size=300)).name


def test_hf_eos_from_tokenizer_config_or_argument(tmp_path):
    path = train_hf_tokenizer(tmp_path, eos="<end>")
    assert HFTokenizer(path).eos_id is None  # no common name, no config
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<end>"}}))
    assert HFTokenizer(path).eos_id == HFTokenizer(path, eos_token="<end>").eos_id is not None
    with pytest.raises(DataError, match="'<nope>' is not in the vocabulary"):
        HFTokenizer(path, eos_token="<nope>")
    no_eos = HFTokenizer(train_hf_tokenizer(tmp_path / "plain", eos="<end>"))
    assert no_eos.eos_id is None
    with pytest.raises(DataError, match="append_eos needs an end-of-document token"):
        encode_documents(no_eos, ["a"], True, np.dtype("<u2"))


def test_bad_tokenizer_files_are_named(tmp_path):
    with pytest.raises(DataError, match=r"tokenizer file .*nope\.json does not exist"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=r"tokenizer\.json is not a valid tokenizer\.json"):
        load_tokenizer(bad)

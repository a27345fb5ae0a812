"""``preprocess`` in process: the tokens written are exactly the tokenizer's, inputs are checked before anything
is written, and an interrupted run resumes to the same bytes as an uninterrupted one."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from trainer.data.errors import DataError
from trainer.data.indexed import IndexedDataset
from trainer.data.preprocess import preprocess, work_paths
from trainer.data.testing import SENTENCES, train_hf_tokenizer, write_jsonl
from trainer.data.tokenizer import ByteTokenizer, load_tokenizer


def _texts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [
        " ".join(SENTENCES[int(i)] for i in rng.integers(0, len(SENTENCES), size=int(rng.integers(1, 6))))
        for _ in range(n)
    ]


def _docs(ds):
    return [ds[i].tolist() for i in range(len(ds))]


def test_text_files_one_document_per_file_or_paragraph(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("first para\nline two\n\n  \nsecond para\n\n\n", encoding="utf-8")
    b = tmp_path / "b.md"
    b.write_text("Grüße\n", encoding="utf-8")
    ds = preprocess([a, b], tmp_path / "files", progress=False)
    assert _docs(ds) == [list(a.read_bytes()), list(b.read_bytes())]
    assert ds.tokenizer == "byte" and ds.meta["sources"] == ["a.txt", "b.md"]
    ds = preprocess([a, b], tmp_path / "paras", text_unit="paragraph", append_eos=True, progress=False)
    tok = ByteTokenizer()
    assert _docs(ds) == [[*tok.encode(t), 256] for t in ("first para\nline two", "second para", "Grüße")]
    assert not any(p.exists() for k, p in work_paths(tmp_path / "paras").items() if k not in ("bin", "idx"))


def test_jsonl_with_a_hugging_face_tokenizer(tmp_path):
    tok = load_tokenizer(train_hf_tokenizer(tmp_path / "tok"))
    texts = _texts(40)
    data = write_jsonl(tmp_path / "d.jsonl", texts[:20], key="body")
    with open(data, "a", encoding="utf-8") as f:  # blank lines and empty documents are skipped
        f.write('\n{"body": ""}\n' + "".join(json.dumps({"body": t}) + "\n" for t in texts[20:]))
    ds = preprocess([data], tmp_path / "out", tokenizer=tok, jsonl_key="body", append_eos=True, progress=False)
    assert _docs(ds) == [[*tok.encode(t), tok.eos_id] for t in texts]
    assert ds.tokenizer == tok.name and ds.vocab_size == tok.vocab_size and ds.dtype == np.uint16


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.txt", r"input .*missing\.txt does not exist"),
        (lambda d: d, r"input .* is not a regular file"),
        (lambda d: _write(d / "empty.txt", ""), r"input .*empty\.txt is empty: it holds no document"),
        (lambda d: _write(d / "blank.txt", " \n\n\t\n"), r"input .*blank\.txt is empty"),
        (lambda d: _write(d / "blank.jsonl", "\n\n"), r"input .*blank\.jsonl is empty"),
        (lambda d: _write(d / "bad.jsonl", "\n{oops\n"), r"bad\.jsonl:2: not a JSON line"),
        (lambda d: _write(d / "list.jsonl", "[1]\n"), r"list\.jsonl:1: expected a JSON object, got list"),
        (lambda d: _write(d / "key.jsonl", '{"txt": "a"}\n'), r"key\.jsonl:1: no field 'text' \(fields: txt\)"),
        (lambda d: _write(d / "num.jsonl", '{"text": 3}\n'), r"num\.jsonl:1: field 'text' is int, not a string"),
    ],
)
def test_bad_inputs_are_refused_before_anything_is_written(tmp_path, make, message):
    good = _write(tmp_path / "good.txt", "fine")
    out = tmp_path / "out" / "ds"
    with pytest.raises(DataError, match=message):
        preprocess([good, make(tmp_path)], out, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_input_is_refused(tmp_path):
    locked = _write(tmp_path / "locked.txt", "secret")
    locked.chmod(0)
    with pytest.raises(DataError, match=r"input .*locked\.txt cannot be read"):
        preprocess([locked], tmp_path / "out", progress=False)


def test_invalid_utf8_and_missing_eos_are_named(tmp_path):
    raw = tmp_path / "latin1.txt"
    raw.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt is not UTF-8 text \(invalid byte at offset 3\)"):
        preprocess([raw], tmp_path / "out", progress=False)
    plain = load_tokenizer(train_hf_tokenizer(tmp_path / "tok", eos="<end>"))
    with pytest.raises(DataError, match="append_eos needs an end-of-document token"):
        preprocess([_write(tmp_path / "ok.txt", "x")], tmp_path / "out", tokenizer=plain, append_eos=True)


def test_existing_output_needs_overwrite(tmp_path):
    a = _write(tmp_path / "a.txt", "one")
    preprocess([a], tmp_path / "ds", progress=False)
    with pytest.raises(DataError, match=r"ds\.idx already exists; pass --overwrite"):
        preprocess([a], tmp_path / "ds", progress=False)
    b = _write(tmp_path / "b.txt", "two")
    assert _docs(preprocess([b], tmp_path / "ds", overwrite=True, progress=False)) == [list(b"two")]


class _InterruptAfter(ByteTokenizer):
    """The byte tokenizer, stopping the run (as Ctrl-C would) on its ``calls``-th batch; counts its batches."""

    def __init__(self, calls: int = -1) -> None:
        self.calls, self.batches = calls, 0

    def encode_arrays(self, texts, dtype):
        self.batches += 1
        if self.batches == self.calls:
            raise KeyboardInterrupt
        return super().encode_arrays(texts, dtype)


def test_an_interrupted_run_resumes_to_the_same_files(tmp_path):
    inputs = [write_jsonl(tmp_path / f"{i}.jsonl", _texts(30, seed=i)) for i in range(3)]
    inputs.insert(1, _write(tmp_path / "t.txt", "a text file between JSONL files"))
    counter = _InterruptAfter()
    reference = preprocess(
        inputs, tmp_path / "ref", tokenizer=counter, append_eos=True, chunk_bytes=500, progress=False
    )
    assert counter.batches > 3 * 8  # every JSONL file is read in several chunks

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # stops inside the last input
        stop = _InterruptAfter(counter.batches - 3)
        preprocess(inputs, out, tokenizer=stop, append_eos=True, chunk_bytes=500, progress=False)
    paths = work_paths(out)
    state = json.loads(paths["sidecar"].read_text())["state"]
    assert state["done_files"] == 3 and state["offset"] > 0 and not paths["idx"].exists()
    with open(paths["tokens"], "ab") as f:  # bytes written after the last commit, as a crash can leave them
        f.write(b"\x07" * 11)

    with pytest.raises(DataError, match=r"used other settings \(append_eos differ\)"):
        preprocess(inputs, out, append_eos=False, chunk_bytes=500, progress=False)
    logs = []
    resumed = preprocess(inputs, out, append_eos=True, chunk_bytes=500, progress=False, log=logs.append)
    assert logs and logs[0].startswith("resuming: 3 of 4 inputs done")
    assert f"{state['num_docs']} documents, {state['num_tokens']} tokens" in logs[0]
    assert resumed.bin_path.read_bytes() == reference.bin_path.read_bytes()
    assert resumed.offsets.tolist() == reference.offsets.tolist()
    assert not paths["sidecar"].exists() and not paths["tokens"].exists() and not paths["offsets"].exists()
    assert _docs(IndexedDataset(out)) == _docs(reference)


def test_a_changed_input_is_not_mixed_into_a_resumed_run(tmp_path):
    inputs = [write_jsonl(tmp_path / f"{i}.jsonl", _texts(10, seed=i)) for i in range(2)]
    with pytest.raises(KeyboardInterrupt):
        preprocess(inputs, tmp_path / "run", tokenizer=_InterruptAfter(2), chunk_bytes=200, progress=False)
    write_jsonl(inputs[0], _texts(11, seed=5))
    with pytest.raises(DataError, match=r"used other settings \(inputs differ\).*--overwrite to start over"):
        preprocess(inputs, tmp_path / "run", chunk_bytes=200, progress=False)
    ds = preprocess(inputs, tmp_path / "run", chunk_bytes=200, overwrite=True, progress=False)
    assert len(ds) == 21


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path

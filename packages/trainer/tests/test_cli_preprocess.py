"""``python -m trainer preprocess`` end to end in subprocesses: the dataset written, bad inputs refused with
exit status 2 before anything is written, and a run killed half-way (SIGKILL) or interrupted (SIGINT)
finishing on rerun with exactly the bytes of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from trainer.data.indexed import IndexedDataset
from trainer.data.preprocess import preprocess, work_paths
from trainer.data.testing import SENTENCES, train_hf_tokenizer, write_jsonl
from trainer.data.tokenizer import load_tokenizer


def _cli(*args, background=False):
    command = [sys.executable, "-m", "trainer", *map(str, args)]
    if background:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_preprocess_text_and_jsonl_with_a_tokenizer_file(tmp_path):
    tok_path = train_hf_tokenizer(tmp_path / "tok")
    text = tmp_path / "book.txt"
    text.write_text("\n\n".join(SENTENCES), encoding="utf-8")
    lines = write_jsonl(tmp_path / "lines.jsonl", SENTENCES[::-1], key="content")
    out = tmp_path / "data" / "corpus"
    result = _cli(
        "preprocess", "--input", text, lines, "--output", out, "--tokenizer", tok_path,
        "--jsonl-key", "content", "--append-eos", "--text-unit", "paragraph", "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    ds = IndexedDataset(out)
    assert (
        result.stdout.strip() == f"wrote {ds.bin_path} and {ds.idx_path}: 10 documents, {ds.num_tokens} tokens (uint16)"
    )
    tok = load_tokenizer(tok_path)
    assert [ds[i].tolist() for i in range(len(ds))] == [
        [*tok.encode(t), tok.eos_id] for t in SENTENCES + SENTENCES[::-1]
    ]


def test_progress_bar_and_help(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    result = _cli("preprocess", "--input", tmp_path / "a.txt", "--output", tmp_path / "a")
    assert result.returncode == 0 and "a.txt" in result.stderr and "100%" not in result.stdout
    assert "preprocess" in _cli("--help").stdout
    missing = _cli()
    assert missing.returncode == 2 and "required: COMMAND" in missing.stderr


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d / "nope.txt", r"input .*nope\.txt does not exist"),
        (lambda d: _touch(d / "empty.jsonl", ""), r"input .*empty\.jsonl is empty: it holds no document"),
        (lambda d: _touch(d / "x.jsonl", '{"body": "a"}\n'), r"x\.jsonl:1: no field 'text' \(fields: body\)"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, setup, message):
    import re

    good = _touch(tmp_path / "good.txt", "fine")
    result = _cli("preprocess", "--input", good, setup(tmp_path), "--output", tmp_path / "out" / "ds")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("trainer preprocess: error: ") and re.search(message, result.stderr)
    assert not (tmp_path / "out").exists()


# The CLI in a child process whose progress saves pause (until a signal comes) once the first input is done: the
# test stops it at that point, however slow the machine, instead of racing a run that may finish first.
PAUSING_CLI = textwrap.dedent(
    """
    import importlib, signal, sys, time
    from trainer.cli import main

    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (pytest-xdist workers ignore it)
    pre = importlib.import_module("trainer.data.preprocess")

    save = pre._save_state

    def save_then_pause(paths, settings, state):
        save(paths, settings, state)
        if state["done_files"] >= 1:
            print("paused", flush=True)
            while True:  # not signal.pause(): a signal that lands before it is called would be missed
                time.sleep(0.05)

    pre._save_state = save_then_pause
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT])
def test_a_stopped_run_resumes_on_rerun(tmp_path, stop):
    inputs = [
        write_jsonl(tmp_path / f"{i}.jsonl", [f"{i}.{j} " + SENTENCES[j % 5] * (j % 7 + 1) for j in range(300)])
        for i in range(6)
    ]
    reference = preprocess(inputs, tmp_path / "ref", append_eos=True, progress=False)
    out = tmp_path / "ds"
    args = ["preprocess", "--input", *inputs, "--output", out, "--append-eos", "--chunk-bytes", "20000", "--quiet"]
    sidecar = work_paths(out)["sidecar"]
    process = subprocess.Popen(
        [sys.executable, "-c", PAUSING_CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    line = process.stdout.readline()
    assert line == "paused\n", line + process.stderr.read()
    os.kill(process.pid, stop)
    _, err = process.communicate(timeout=600)
    if stop == signal.SIGINT:
        assert process.returncode == 130 and "interrupted; rerun the same command" in err
    else:
        assert process.returncode == -signal.SIGKILL
    state = json.loads(sidecar.read_text())["state"]
    assert 1 <= state["done_files"] < len(inputs) and not out.with_suffix(".idx").exists()

    result = _cli(*args)
    assert result.returncode == 0, result.stderr
    assert f"resuming: {state['done_files']} of 6 inputs done" in result.stderr
    ds = IndexedDataset(out)
    assert ds.bin_path.read_bytes() == reference.bin_path.read_bytes()
    assert ds.offsets.tolist() == reference.offsets.tolist()
    assert not sidecar.exists()


def _touch(path, text):
    path.write_text(text, encoding="utf-8")
    return path

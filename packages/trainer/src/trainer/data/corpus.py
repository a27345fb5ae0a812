"""The embedded default corpus: the source of 47 pure-Python standard-library modules, one document each.

Every Python installation has these files (``sysconfig``'s ``stdlib`` path), so ``trainer train`` with no data
arguments trains on real text offline (about 1.3 MB on CPython 3.11: code, docstrings and comments in English).
The same Python version gives the same files; the dataset is built on first use, tokenized with the run's
tokenizer (an end-of-document token after each module when the tokenizer has one), into
``cache_dir/stdlib-<python>-<hash>.{bin,idx}``, where the hash covers the tokenizer and every file's bytes, so
a patched or different stdlib gets its own cache entry. Building takes well under a second with the byte
tokenizer; concurrent ranks wait on a file lock instead of building it twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

from .errors import DataError
from .indexed import IndexedDataset, dtype_for_vocab, write_dataset
from .tokenizer import Tokenizer, encode_documents

# Long-lived pure-Python modules (present from 3.10 on), found as NAME.py or NAME/__init__.py.
MODULES = (
    *("argparse", "textwrap", "difflib", "dataclasses", "enum", "fractions", "functools", "heapq", "calendar"),
    *("configparser", "contextlib", "copy", "csv", "bisect", "shlex", "string", "statistics", "random"),
    *("tokenize", "pprint", "gettext", "json.decoder", "json.encoder", "json", "collections", "logging"),
    *("threading", "weakref", "abc", "numbers", "operator", "shutil", "tempfile", "glob", "fnmatch", "queue"),
    *("sched", "base64", "uuid", "codecs", "cmd", "code", "traceback", "timeit", "colorsys", "graphlib", "reprlib"),
)


def default_cache_dir() -> Path:
    """``$TRAINER_CACHE``, else ``$XDG_CACHE_HOME/trainer``, else ``~/.cache/trainer``."""
    if "TRAINER_CACHE" in os.environ:
        return Path(os.environ["TRAINER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trainer"


def stdlib_root() -> Path:
    """This interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(stdlib: str | Path | None = None) -> list[Path]:
    """The corpus's files in this installation, in the fixed order of ``MODULES`` (missing ones left out)."""
    root = Path(stdlib) if stdlib is not None else stdlib_root()
    files = []
    for name in MODULES:
        base = root.joinpath(*name.split("."))
        for candidate in (base.with_name(base.name + ".py"), base / "__init__.py"):
            if candidate.is_file():
                files.append(candidate)
                break
    return files


def default_corpus(
    cache_dir: str | Path | None,
    tokenizer: Tokenizer,
    stdlib: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> IndexedDataset:
    """The default corpus tokenized by ``tokenizer``, from the cache or built into it (see the module docstring).
    ``log`` hears when a build starts and how long it took (nothing when the cache already has it)."""
    root = Path(stdlib) if stdlib is not None else stdlib_root()
    files = corpus_files(root)
    if len(files) < len(MODULES) // 2:
        raise DataError(
            f"the standard library at {root} has only {len(files)} of the "
            f"{len(MODULES)} modules of the default corpus; give a dataset instead"
        )
    texts = [f.read_bytes() for f in files]
    key = hashlib.sha256(tokenizer.name.encode())
    for f, text in zip(files, texts):
        key.update(f"{f.name}:{len(text)}:".encode())
        key.update(text)
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    prefix = cache / f"stdlib-{version}-{key.hexdigest()[:16]}"
    with _locked(cache / f".{prefix.name}.lock"):
        with contextlib.suppress(DataError):
            return IndexedDataset(prefix)
        began = time.perf_counter()
        if log is not None:
            size = sum(len(t) for t in texts) / 2**20
            log(f"data: building the default corpus cache {prefix} ({len(files)} files, {size:.1f} MB; first use)")
        eos = tokenizer.eos_id is not None
        docs = encode_documents(
            tokenizer, [t.decode("utf-8") for t in texts], eos, dtype_for_vocab(tokenizer.vocab_size)
        )
        meta = {
            "tokenizer": tokenizer.name,
            "eos_id": tokenizer.eos_id,
            "append_eos": eos,
            "sources": [f.relative_to(root).as_posix() for f in files],
            "corpus": f"python {sys.version.split()[0]} standard library",
        }
        built = write_dataset(prefix, docs, tokenizer.vocab_size, meta)
        if log is not None:
            log(f"data: built {built.num_tokens:,} tokens in {time.perf_counter() - began:.1f} s")
        return built


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` where the platform has ``fcntl``; elsewhere racing builders both write the same
    files atomically, which is also safe."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

"""The ``trainer`` command: one subcommand per job, each with a small function that adds its parser.

A subcommand's parser sets ``run``, the function that does the work and returns the exit status. Expected
failures (configuration, data, checkpoint, launch: the types in ``USER_ERRORS``) print one line, no
traceback, and exit with the code :mod:`trainer.exits` documents (2 for bad input); ``--debug`` shows the
traceback as well. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from trainer import exits
from trainer.commands import add_convert, add_generate, add_layout, add_plan, add_train
from trainer.serve_command import add_serve

USER_ERRORS = exits.USER_ERRORS


def add_preprocess(commands: argparse._SubParsersAction) -> None:
    """``trainer preprocess``: text or JSONL files to an indexed dataset (resumable)."""
    p = commands.add_parser(
        "preprocess",
        help="tokenize text or JSONL files into an indexed dataset (PREFIX.bin + PREFIX.idx)",
        description=(
            "Tokenize text or JSONL files into an indexed dataset. *.jsonl/*.ndjson files hold one JSON object per "
            "line (the document in field --jsonl-key); other files are UTF-8 text, one document per file or per "
            "blank-line-separated paragraph (--text-unit). An interrupted run continues where it stopped when "
            "rerun with the same arguments."
        ),
        epilog=(
            "examples:\n  trainer preprocess --input notes.txt --output data/notes\n"
            "  trainer preprocess --input part-*.jsonl --output data/web --tokenizer tokenizer.json --append-eos"
        ),
    )
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="text or JSONL files")
    p.add_argument("--output", required=True, metavar="PREFIX", help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--tokenizer", default="byte", help="'byte' (default) or the path of a tokenizer.json")
    p.add_argument("--jsonl-key", default="text", metavar="KEY", help="field of a JSONL line holding the text")
    p.add_argument("--append-eos", action="store_true", help="end each document with the tokenizer's EOS token")
    p.add_argument("--text-unit", choices=("file", "paragraph"), default="file", help="document unit of text files")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset or unfinished run")
    p.add_argument(
        "--chunk-bytes", type=int, default=16 << 20, metavar="N", help="progress is saved every N bytes of JSONL"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_preprocess)


def run_preprocess(args: argparse.Namespace) -> int:
    from trainer.data.preprocess import preprocess

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    try:
        ds = preprocess(
            args.input,
            args.output,
            tokenizer=args.tokenizer,
            jsonl_key=args.jsonl_key,
            append_eos=args.append_eos,
            text_unit=args.text_unit,
            overwrite=args.overwrite,
            chunk_bytes=args.chunk_bytes,
            progress=not args.quiet,
            log=log,
        )
    except KeyboardInterrupt:
        log("trainer preprocess: interrupted; rerun the same command to continue where it stopped")
        return 130
    print(f"wrote {ds.bin_path} and {ds.idx_path}: {len(ds)} documents, {ds.num_tokens} tokens ({ds.dtype.name})")
    return 0


EXAMPLES = """\
examples:
  trainer train --nproc 2 --steps 20 --save ckpt     # train a tiny GPT on 2 local ranks, save at the end
  trainer generate --load ckpt --prompt "import "   # continue a prompt with the trained model
  trainer serve --load ckpt --port 8000             # an OpenAI-compatible completions server
  trainer convert --to-hf hf-model --load ckpt      # write it as a Hugging Face model
  trainer plan --model llama3-8b --gpus 64 --seq-len 8192 --global-batch 512
"""

SUBCOMMANDS = (add_train, add_generate, add_convert, add_plan, add_preprocess, add_layout, add_serve)


class HelpFormatter(argparse.HelpFormatter):
    """Text with line breaks (the examples of an epilog) keeps its lines, one-line text is wrapped; an
    option's help ends with its default unless it says it already."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text.strip():
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        value = action.default
        shown = value is not None and value is not argparse.SUPPRESS and not isinstance(value, bool) and value != []
        if shown and action.option_strings and not action.required and "default" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``trainer`` command, with every subcommand in ``SUBCOMMANDS``."""
    top = argparse.ArgumentParser(
        prog="trainer",
        description="Train GPT models with any mix of parallelisms; each command has its own --help.",
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    top.add_argument("--debug", action="store_true", help="show the traceback of expected errors too")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(commands)
    for parser in commands.choices.values():
        parser.formatter_class = HelpFormatter
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``trainer`` command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except exits.Interrupted as stop:
        print(f"trainer {args.command}: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print(f"trainer {args.command}: interrupted", file=sys.stderr)
        return exits.SIGINT
    except USER_ERRORS as err:
        if args.debug:
            traceback.print_exc()
        print(f"trainer {args.command}: error: {_rank_tag()}{err}", file=sys.stderr)
        return exits.exit_code(err)


def _rank_tag() -> str:
    """``rank R: `` under torchrun with several ranks (each rank prints its own error), else nothing."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"rank {os.environ['RANK']}: " if world > 1 and "RANK" in os.environ else ""


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``trainer serve``: the parser of the subcommand (the work is in :mod:`trainer.infer.serve`)."""

from __future__ import annotations

import argparse


def add_serve(commands: argparse._SubParsersAction) -> None:
    """``trainer serve``: an OpenAI-compatible completions server over a checkpoint (any layout saved it)."""
    p = commands.add_parser(
        "serve",
        help="serve a checkpoint over an OpenAI-compatible HTTP API",
        description=(
            "Serve a checkpoint (saved at any layout) with continuous batching over a paged KV cache: "
            "POST /v1/completions, GET /v1/models, GET /health. --tp N starts N local ranks (or run under torchrun)."
        ),
        epilog=(
            "examples:\n  trainer serve --load ckpt --port 8000\n"
            "  trainer serve --load ckpt --tp 2 --port 0        # any free port: the first line printed says which"
        ),
    )
    p.add_argument("--load", required=True, metavar="DIR", help="a checkpoint, or a directory of them (the newest)")
    p.add_argument("--tp", type=int, default=1, metavar="N", help="tensor-parallel ranks")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (localhost only unless changed)")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (the first line printed says which)")
    p.add_argument("--block-size", type=int, default=16, metavar="N", help="positions per KV-cache block")
    p.add_argument("--num-blocks", type=int, metavar="N", help="KV-cache blocks (default: 8 full-length sequences)")
    p.add_argument("--max-batch-tokens", type=int, default=256, metavar="N", help="tokens per step (prefill chunks)")
    p.add_argument("--max-seqs", type=int, default=32, metavar="N", help="sequences running at once")
    p.add_argument("--model-name", metavar="NAME", help="model id of /v1/models (default: checkpoint dir name)")
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from .infer.serve import ServeOptions, serve

    names = ("load", "tp", "host", "port", "block_size", "num_blocks", "max_batch_tokens", "max_seqs", "model_name")
    return serve(ServeOptions(**{name: getattr(args, name) for name in names}))

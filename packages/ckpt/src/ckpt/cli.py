"""The ``ckpt`` command: ``ckpt inspect PATH`` shows a checkpoint and verifies its checksums."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import CheckpointError
from .inspection import inspect, render, verify


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ckpt`` and ``python -m ckpt``; exits non-zero when a check fails."""
    parser = argparse.ArgumentParser(prog="ckpt", description="Inspect ckpt checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("inspect", help="list tensors, layout and files; verify checksums")
    show.add_argument("path")
    show.add_argument("--no-verify", action="store_true", help="skip reading the data files")
    show.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    try:
        summary = inspect(args.path)
    except CheckpointError as e:
        print(f"ckpt: {e}", file=sys.stderr)
        return 2
    problems = None if args.no_verify else verify(args.path)
    if args.json:
        print(json.dumps({**summary, "problems": problems}, indent=1))
    else:
        print(render(summary, problems))
    return 1 if problems else 0

"""``trainer train``, ``generate`` and ``layout``: flags mapped onto the run configuration's typed sections.

Every field of every section can be set with ``--set section.field=value`` (TOML syntax for the value);
the common ones have their own flags. The run is checked (``check_run``) before any process starts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import tomllib

from .config import check_inputs, check_run, load_run_config, to_toml
from .errors import TrainerError

TRAIN_EXAMPLES = """\
examples:
  trainer train --nproc 8 --tp 2 --pp 2 --sequence-parallel --steps 20 --seq-len 64 --global-batch 16 \\
      --micro-batch 2 --lr 3e-3                      # 8 local CPU ranks, TP2 x PP2 x DP2
  trainer train --nproc 2 --save ckpt --save-every 50 --metrics-file metrics.jsonl
  trainer train --config run.toml --set optim.weight_decay=0.05 --print-config
  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
      -m trainer train --model gpt2 --tp 8 --precision bf16 --save /shared/ckpt
"""

# flag -> (section, field); flags with a ``store_true`` action are listed in SWITCHES
FLAGS = {
    "model": ("model", "preset"),
    "steps": ("train", "steps"),
    "seed": ("train", "seed"),
    "seq_len": ("train", "seq_len"),
    "micro_batch": ("train", "micro_batch"),
    "global_batch": ("train", "global_batch"),
    "tp": ("parallel", "tp"),
    "pp": ("parallel", "pp"),
    "vpp": ("parallel", "vpp"),
    "cp": ("parallel", "cp"),
    "ep": ("parallel", "ep"),
    "etp": ("parallel", "etp"),
    "dp": ("parallel", "dp"),
    "dp_shard": ("parallel", "dp_shard"),
    "zero": ("train", "zero"),
    "pipeline_schedule": ("train", "pipeline_schedule"),
    "precision": ("train", "precision"),
    "peak_tflops": ("train", "peak_tflops"),
    "recompute": ("train", "recompute"),
    "save": ("train", "save"),
    "load": ("train", "load"),
    "init_from_hf": ("train", "init_from_hf"),
    "save_every": ("train", "save_every"),
    "eval_every": ("train", "eval_every"),
    "metrics_file": ("train", "metrics_file"),
    "tensorboard": ("train", "tensorboard"),
    "lr": ("optim", "lr"),
    "warmup_steps": ("optim", "warmup_steps"),
    "tokenizer": ("data", "tokenizer"),
}
FLOATS = {"lr", "peak_tflops"}
METAVARS = {
    "save": "DIR",
    "load": "DIR",
    "init_from_hf": "DIR",
    "tensorboard": "DIR",
    "metrics_file": "FILE",
    "tokenizer": "NAME",
    "peak_tflops": "TFLOPS",
}
SWITCHES = {"sequence_parallel": ("train", "sequence_parallel"), "comm_report": ("train", "comm_report")}
INTS = {"steps", "seed", "seq_len", "micro_batch", "global_batch", "tp", "pp", "vpp", "cp", "ep", "etp", "dp",
        "dp_shard", "save_every", "eval_every", "warmup_steps", "zero"}  # fmt: skip


def add_train(commands: argparse._SubParsersAction) -> None:
    """``trainer train``: train a GPT model on any layout (``--nproc N`` local ranks, or under torchrun)."""
    p = commands.add_parser(
        "train",
        help="train a GPT model",
        description=(
            "Train a GPT model on any mix of tensor, sequence, pipeline, data, context and expert parallelism. "
            "Start N local ranks with --nproc N, or run under torchrun (one process per GPU, any number of nodes). "
            "Settings come from the defaults, then --config FILE.toml, then the flags, then --set; --print-config "
            "shows the result. Bad settings are refused before any rank starts (exit status 2)."
        ),
        epilog=TRAIN_EXAMPLES,
    )
    _run_options(p)
    p.add_argument(
        "--data", nargs="+", metavar="PREFIX", help="datasets from trainer preprocess (default: the embedded corpus)"
    )
    p.add_argument("--nproc", type=int, metavar="N", help="start N local ranks (default: 1; under torchrun: its world)")
    p.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        metavar="N",
        help="with --nproc: restart the ranks after a failure, up to N times, resuming from the newest intact "
        "checkpoint under --save (under torchrun, use torchrun's own --max-restarts)",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration as TOML and exit")
    p.add_argument("--dry-run", action="store_true", help="build rank --rank of a --world-size job here; report it")
    p.add_argument("--world-size", type=int, metavar="N", help="with --dry-run: the job's world size (required there)")
    p.add_argument("--rank", type=int, default=0, metavar="R", help="with --dry-run: the rank to build")
    p.add_argument(
        "--dry-run-device", choices=("auto", "real", "meta"), default="auto",
        help="with --dry-run: build the model at real size (and run one simulated step), on the meta device "
        "(shapes only), or real when it fits here (default: %(default)s)",
    )  # fmt: skip
    p.set_defaults(run=run_train)


def add_layout(commands: argparse._SubParsersAction) -> None:
    """``trainer layout``: the rank layout of a configuration (every rank's coordinates and groups)."""
    p = commands.add_parser(
        "layout",
        help="print the rank layout of a configuration",
        description="Print where each rank of a run sits: its coordinates on every axis and its process groups.",
        epilog="example:\n  trainer layout --world-size 16 --tp 2 --pp 2 --cp 2",
    )
    _run_options(p)
    p.add_argument("--world-size", type=int, required=True, metavar="N", help="number of ranks of the run")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run_layout)


def add_generate(commands: argparse._SubParsersAction) -> None:
    """``trainer generate``: continue a prompt with a trained checkpoint (any layout saved it)."""
    p = commands.add_parser(
        "generate",
        help="sample text from a checkpoint",
        description=(
            "Continue a prompt with a trained model, in one process, whatever layout saved the checkpoint. "
            "The tokenizer and model shape come from the checkpoint's recorded configuration."
        ),
        epilog='example:\n  trainer generate --load ckpt --prompt "def main(" --max-new-tokens 100 --temperature 0',
    )
    p.add_argument("--load", required=True, metavar="DIR", help="a checkpoint, or a directory of them (the newest)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=40, metavar="K", help="sample among the K likeliest tokens (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    p.add_argument(
        "--no-cache", dest="use_cache", action="store_false", help="no KV cache: rerun the whole sequence per token"
    )
    p.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from .generate import generate

    text = generate(
        args.load, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, seed=args.seed, use_cache=args.use_cache,
    )  # fmt: skip
    print(text)
    return 0


def add_convert(commands: argparse._SubParsersAction) -> None:
    """``trainer convert``: a checkpoint to Hugging Face's format, or a Hugging Face model to a checkpoint."""
    p = commands.add_parser(
        "convert",
        help="convert checkpoints to and from Hugging Face's format",
        description=(
            "Write a checkpoint (any layout) as a Hugging Face model directory (GPT-2 or Llama architecture, "
            "safetensors), or read one into a weights-only checkpoint that trainer train --load starts from."
        ),
        epilog=(
            "examples:\n  trainer convert --to-hf hf-model --load ckpt\n"
            "  trainer convert --from-hf hf-model --save ckpt-from-hf"
        ),
    )
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--to-hf", metavar="OUT", help="write the checkpoint at --load as a Hugging Face directory OUT")
    way.add_argument("--from-hf", metavar="DIR", help="read a Hugging Face directory into a checkpoint under --save")
    p.add_argument(
        "--load", metavar="DIR", help="a checkpoint, or a directory of them (the newest); required with --to-hf"
    )
    p.add_argument("--save", metavar="DIR", help="where the weights-only checkpoint goes; required with --from-hf")
    for axis in ("tp", "pp", "ep", "etp"):  # --from-hf under torchrun: each rank reads only its slices
        p.add_argument(
            f"--{axis}",
            type=int,
            metavar="N",
            help=f"with --from-hf under torchrun: the {axis} size of the reading ranks (default: 1)",
        )
    p.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from .convert import export_to_hf, import_from_hf

    if args.to_hf:
        if not args.load:
            raise TrainerError("convert --to-hf needs --load CHECKPOINT")
        print(export_to_hf(args.load, args.to_hf))
    else:
        if not args.save:
            raise TrainerError("convert --from-hf needs --save DIR")
        parallel = {a: getattr(args, a) for a in ("tp", "pp", "ep", "etp") if getattr(args, a) is not None}
        print(import_from_hf(args.from_hf, args.save, parallel=parallel))
    return 0


def add_plan(commands: argparse._SubParsersAction) -> None:
    """``trainer plan``: the layouts that fit a model on a cluster, fastest first, or one layout explained."""
    from .plan.cli import add_plan_options

    p = commands.add_parser(
        "plan",
        help="suggest parallel layouts for a model on a cluster, or explain one",
        description="Search the layouts (--top K; layout flags pin the search) or evaluate the one the layout "
        "flags (those of trainer train) give, from a memory and time model; nothing is run. --model takes a "
        "preset or a Hugging Face config.json.",
        epilog="examples:\n  trainer plan --model llama3-8b --gpus 64 --seq-len 8192 --global-batch 512 --top 5\n"
        "  trainer plan --model llama3-8b --gpus 64 --seq-len 8192 --global-batch 512 --tp 8 --pp 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _run_options(p)
    add_plan_options(p)
    p.set_defaults(run=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    from .plan.cli import run_plan

    return run_plan(args, overrides_from(args))


def _run_options(p: argparse.ArgumentParser) -> None:
    from .config.docs import choices, field_help

    p.add_argument(
        "--config",
        metavar="FILE.toml",
        help="a TOML file with [model] [parallel] [train] [optim] [data]; the flags win (default: none)",
    )
    for flag, (section, field) in FLAGS.items():
        kind = int if flag in INTS else float if flag in FLOATS else str
        allowed = choices(section, field)
        p.add_argument(
            "--" + flag.replace("_", "-"), dest=flag, type=kind, default=None, choices=allowed,
            metavar=None if allowed else METAVARS.get(flag, "N" if kind is int else "X" if kind is float else "VALUE"),
            help=field_help(section, field),
        )  # fmt: skip
    p.add_argument("--zero-stage", dest="zero", type=int, choices=(0, 1, 2, 3), help=argparse.SUPPRESS)
    for flag, (section, field) in SWITCHES.items():
        p.add_argument(
            "--" + flag.replace("_", "-"), dest=flag, action="store_true", default=None, help=field_help(section, field)
        )
    p.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
        help="set any configuration field (TOML value syntax; repeatable; wins over the flags); "
        "the fields are listed in the CLI reference (default: none)",
    )  # fmt: skip


def overrides_from(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The sections' fields the flags set (``--set`` last, so it wins)."""
    out: dict[str, dict[str, Any]] = {}
    for flag, (section, field) in {**FLAGS, **SWITCHES}.items():
        value = getattr(args, flag, None)
        if value is not None:
            out.setdefault(section, {})[field] = int(value) if flag == "zero" else value
    if getattr(args, "data", None):
        out.setdefault("data", {})["paths"] = list(args.data)
    for item in args.set:
        key, sep, text = item.partition("=")
        section, dot, field = key.partition(".")
        if not sep or not dot:
            raise TrainerError(f"--set {item!r}: expected SECTION.FIELD=VALUE, for example optim.lr=1e-3")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text  # a bare string
        out.setdefault(section, {})[field] = value
    return out


def run_train(args: argparse.Namespace) -> int:
    from .convert import with_checkpoint_model
    from .launch import global_rank, run_ranks, under_torchrun, world_size

    if args.nproc is not None and args.nproc < 1:
        raise TrainerError(f"--nproc {args.nproc}: must be >= 1")
    if args.max_restarts < 0:
        raise TrainerError(f"--max-restarts {args.max_restarts}: must be >= 0")
    overrides = overrides_from(args)
    cfg = load_run_config(args.config, overrides)
    in_file = args.config is not None and "model" in tomllib.loads(Path(args.config).read_text())
    explicit = "model" in overrides or in_file
    cfg = with_checkpoint_model(cfg, explicit_model=explicit)
    if args.print_config:
        print(to_toml(cfg), end="")
        return 0
    if args.dry_run:
        from .train.dry_run import dry_run

        if args.world_size is None:
            raise TrainerError("--dry-run needs --world-size N")
        print(json.dumps(dry_run(cfg, args.world_size, args.rank, device=args.dry_run_device), indent=2))
        return 0
    world = world_size(args.nproc)
    check_run(cfg, world)
    check_inputs(cfg)
    first_rank = global_rank() == 0
    if first_rank and not under_torchrun():
        print(f"trainer train: starting {world} rank{'s' if world > 1 else ''}", file=sys.stderr, flush=True)
    began = time.perf_counter()
    records = run_ranks(cfg, args.nproc, max_restarts=args.max_restarts)
    if records and first_rank:  # under torchrun every rank returns here; one summary is enough
        print(summary(cfg, records, time.perf_counter() - began), file=sys.stderr)
    return 0


def summary(cfg: Any, records: list[dict[str, Any]], seconds: float) -> str:
    """The closing line of a training run."""
    first, last = records[0], records[-1]
    text = (
        f"trained steps {first['step']}..{last['step']}: loss {first['loss']:.4f} -> {last['loss']:.4f} "
        f"in {seconds:.1f} s ({last.get('tokens', 0):,} tokens seen)"
    )
    skipped = sum(bool(r.get("skipped")) for r in records)
    if skipped:
        text += f"; {skipped} steps skipped (non-finite or fp16 overflow)"
    if cfg.train.save:
        text += f"; checkpoints in {cfg.train.save}"
    if cfg.train.metrics_file:
        text += f"; metrics in {cfg.train.metrics_file}"
    return text


def run_layout(args: argparse.Namespace) -> int:
    from pstate import layout
    from pstate.cli import describe, render

    cfg = load_run_config(args.config, overrides_from(args))
    check_run(cfg, args.world_size)
    data = describe(layout(cfg.parallel, args.world_size))
    print(json.dumps(data, indent=2) if args.json else render(data))
    return 0

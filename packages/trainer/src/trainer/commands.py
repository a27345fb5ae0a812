"""``trainer train``, ``generate`` and ``layout``: flags mapped onto the run configuration's typed sections.

Every field of every section can be set with ``--set section.field=value`` (TOML syntax for the value);
the common ones have their own flags. The run is checked (``check_run``) before any process starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import tomllib

from .config import check_run, load_run_config, to_toml
from .errors import TrainerError

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
    "zero": ("train", "zero"),
    "pipeline_schedule": ("train", "pipeline_schedule"),
    "precision": ("train", "precision"),
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
FLOATS = {"lr"}
SWITCHES = {"sequence_parallel": ("train", "sequence_parallel"), "comm_report": ("train", "comm_report")}
INTS = {"steps", "seed", "seq_len", "micro_batch", "global_batch", "tp", "pp", "vpp", "cp", "ep", "etp", "dp",
        "save_every", "eval_every", "warmup_steps"}  # fmt: skip


def add_train(commands: argparse._SubParsersAction) -> None:
    """``trainer train``: train a GPT model on any layout (``--nproc N`` local ranks, or under torchrun)."""
    p = commands.add_parser("train", help="train a GPT model", description=__doc__)
    _run_options(p)
    p.add_argument(
        "--data", nargs="+", metavar="PREFIX", help="datasets from trainer preprocess (default: the embedded corpus)"
    )
    p.add_argument("--nproc", type=int, metavar="N", help="start N local ranks (not under torchrun)")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration as TOML and exit")
    p.set_defaults(run=run_train)


def add_layout(commands: argparse._SubParsersAction) -> None:
    """``trainer layout``: the rank layout of a configuration (every rank's coordinates and groups)."""
    p = commands.add_parser("layout", help="print the rank layout of a configuration")
    _run_options(p)
    p.add_argument("--world-size", type=int, required=True, metavar="N")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=run_layout)


def add_generate(commands: argparse._SubParsersAction) -> None:
    """``trainer generate``: continue a prompt with a trained checkpoint (any layout saved it)."""
    p = commands.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("--load", required=True, metavar="DIR", help="a checkpoint, or a directory of them (the newest)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", dest="use_cache", action="store_false", help="no KV cache: rerun all per token")
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
    p = commands.add_parser("convert", help="convert checkpoints to and from Hugging Face's format")
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--to-hf", metavar="OUT", help="write the checkpoint at --load as a Hugging Face directory OUT")
    way.add_argument("--from-hf", metavar="DIR", help="read a Hugging Face directory into a checkpoint under --save")
    p.add_argument("--load", metavar="DIR", help="with --to-hf: a checkpoint, or a directory of them (the newest)")
    p.add_argument("--save", metavar="DIR", help="with --from-hf: where the weights-only checkpoint goes")
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
        print(import_from_hf(args.from_hf, args.save))
    return 0


def add_plan(commands: argparse._SubParsersAction) -> None:
    """``trainer plan``: the layouts that fit a model on a cluster, fastest first (estimated)."""
    p = commands.add_parser("plan", help="suggest parallel layouts for a model on a cluster")
    p.add_argument("--model", required=True, metavar="PRESET")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="per GPU, in the training dtype")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--global-batch", type=int, required=True)
    p.add_argument("--vocab-size", type=int, help="for presets without one")
    p.add_argument("--top", type=int, default=5)
    p.set_defaults(run=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    from .model import preset
    from .plan import Cluster, plan, render

    model = preset(args.model)
    if args.vocab_size:
        model = model.with_overrides(vocab_size=args.vocab_size)
    cluster = Cluster(args.gpus, args.gpus_per_node, args.gpu_memory, args.peak_tflops)
    plans = plan(model, cluster, seq_len=args.seq_len, global_batch=args.global_batch, top=args.top)
    print(render(plans, args.model, args.seq_len, args.global_batch))
    return 0 if plans else 1


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.toml", help="a TOML file with [model] [parallel] [train] [optim] [data]")
    for flag in FLAGS:
        kind = int if flag in INTS else float if flag in FLOATS else str
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, type=kind, default=None)
    p.add_argument("--zero-stage", dest="zero", type=int, choices=(0, 1, 2, 3), help=argparse.SUPPRESS)
    for flag in SWITCHES:
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, action="store_true", default=None)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="any other field")


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
    from .launch import run_ranks, world_size

    overrides = overrides_from(args)
    cfg = load_run_config(args.config, overrides)
    in_file = args.config is not None and "model" in tomllib.loads(Path(args.config).read_text())
    explicit = "model" in overrides or in_file
    cfg = with_checkpoint_model(cfg, explicit_model=explicit)
    if args.print_config:
        print(to_toml(cfg), end="")
        return 0
    check_run(cfg, world_size(args.nproc))
    records = run_ranks(cfg, args.nproc)
    if records:
        first, last = records[0], records[-1]
        print(
            f"trained steps {first['step']}..{last['step']}: loss {first['loss']:.4f} -> {last['loss']:.4f}",
            file=sys.stderr,
        )
    return 0


def run_layout(args: argparse.Namespace) -> int:
    import json

    from pstate import layout
    from pstate.cli import describe, render

    cfg = load_run_config(args.config, overrides_from(args))
    check_run(cfg, args.world_size)
    data = describe(layout(cfg.parallel, args.world_size))
    print(json.dumps(data, indent=2) if args.json else render(data))
    return 0

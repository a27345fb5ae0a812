"""``trainer plan``'s arguments and its run: search (``--top K``, the layout flags given pin the search)
or evaluate (layout flags without ``--top``: that one layout, explained)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from ..errors import TrainerError
from .hardware import known_hardware

# the ``trainer train`` flags that choose a layout, and the Layout field each sets
LAYOUT_FLAGS = {
    "tp": "tp", "pp": "pp", "vpp": "vpp", "cp": "cp", "ep": "ep", "etp": "etp", "zero": "zero",
    "recompute": "recompute", "micro_batch": "micro_batch", "sequence_parallel": "sequence_parallel",
    "pipeline_schedule": "schedule",
}  # fmt: skip


def add_plan_options(p: argparse.ArgumentParser) -> None:
    """The options of ``trainer plan`` beyond the ``trainer train`` ones (whose ``--model`` here also takes
    a Hugging Face ``config.json``, and whose ``--peak-tflops`` replaces the profile's 16-bit peak)."""
    for action in p._actions:
        if action.dest == "model":
            action.choices, action.metavar = None, "PRESET|CONFIG.json"
            action.help = "a preset, or a Hugging Face config.json or its folder (default: the --config file's)"
    p.add_argument("--gpus", type=int, required=True, metavar="N", help="GPUs in the cluster (required)")
    known = ", ".join(known_hardware())
    p.add_argument(
        "--hardware", default="h100-sxm", metavar="NAME|FILE",
        help=f"a hardware profile ({known}) or a TOML file with the same fields (default: %(default)s)",
    )  # fmt: skip
    p.add_argument("--gpus-per-node", type=int, metavar="N", help="GPUs per node (default: the profile's)")
    p.add_argument("--gpu-memory", type=float, metavar="GIB", help="memory per GPU (default: the profile's)")
    p.add_argument("--vocab-size", type=int, metavar="N", help="vocabulary size (default: the model's)")
    p.add_argument(
        "--top", type=int, metavar="K",
        help="search and print the K fastest layouts that fit; without it, layout flags evaluate that one "
        "layout (default: search, K=5, when no layout flag is given)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="every figure as JSON")
    p.add_argument(
        "--check", action="store_true",
        help="dry-run the layouts found (ranks 0, the middle one and the last; see trainer train --dry-run) and "
        "report each rank's bytes beside the planner's; a layout the trainer refuses exits 2",
    )  # fmt: skip


def run_plan(args: argparse.Namespace, overrides: dict) -> int:
    from ..config import load_run_config
    from . import Cluster, Layout, Workload, evaluate, render, render_json, resolve_model, search, smallest_cluster
    from .render import breakdown, command

    if args.gpus < 1:
        raise TrainerError(f"--gpus={args.gpus}: must be >= 1")
    overrides = {k: dict(v) for k, v in overrides.items()}
    overrides.get("model", {}).pop("preset", None)
    if not args.config and args.precision is None:
        overrides.setdefault("train", {})["precision"] = "bf16"
    cfg = load_run_config(args.config, overrides)
    if args.model:  # a preset or a config.json; without it the model is the --config file's
        cfg = dataclasses.replace(cfg, model=resolve_model(args.model, args.vocab_size))
    elif args.vocab_size:
        cfg = dataclasses.replace(cfg, model=cfg.model.with_overrides(vocab_size=args.vocab_size))
    model_name = args.model or "(--config)"
    model = cfg.model
    if model.vocab_size is None:
        raise TrainerError("plan: the model needs a vocab_size (--vocab-size N, or a preset or config.json with one)")
    t = cfg.train
    if not args.config and (args.seq_len is None or args.global_batch is None):
        raise TrainerError("plan needs --seq-len and --global-batch (or a --config that sets them)")
    if t.global_batch is None:
        raise TrainerError("plan needs --global-batch: the sequences per step fix the data-parallel work")
    cluster = Cluster(args.gpus, args.hardware, args.gpus_per_node, args.gpu_memory, args.peak_tflops)
    hw, work = cluster.profile, Workload(model, t.seq_len, t.global_batch, t.precision, t.cp_attention)
    given = {f: getattr(args, flag) for flag, f in LAYOUT_FLAGS.items() if getattr(args, flag, None) is not None}
    head = {"model": model_name, "gpus": args.gpus, "hardware": dataclasses.asdict(hw), "seq_len": t.seq_len,
            "global_batch": t.global_batch, "precision": t.precision}  # fmt: skip
    if given and args.top is None:
        result = evaluate(work, Layout.from_run_config(cfg, args.gpus), hw)
        if args.check:
            return _checked([result], args.json)
        if args.json:
            print(render_json([result], model_name, model, {**head, "mode": "evaluate"}))
        else:
            verdict = "fits" if result.fits else "DOES NOT FIT"
            print(f"{verdict}: {result.memory_gib:.1f} GiB per GPU of {result.memory.usable / 2**30:.1f} usable\n")
            print(breakdown(result))
            print("\ncommand: " + command(result, model_name, model))
        return 0 if result.fits else 1
    found = search(work, args.gpus, hw, top=args.top or 5, fixed=given)
    if found and args.check:
        return _checked(found, args.json)
    if found:
        print(render_json(found, model_name, model, {**head, "mode": "search"}) if args.json else
              render(found, model_name, model))  # fmt: skip
        return 0
    smallest = smallest_cluster(work, hw, start=args.gpus * 2) if not given else None
    where = ""
    if smallest:
        world, layout = smallest
        nodes = -(-world // hw.gpus_per_node)
        where = (f"; the smallest cluster of {hw.name} that holds it has {world} GPUs ({nodes} node"
                 f"{'s' if nodes > 1 else ''}), for example: {command(layout, model_name, model)}")  # fmt: skip
    message = f"no layout fits {model_name} on {args.gpus} x {hw.name} ({hw.memory_gib:g} GiB){where}"
    print(json.dumps({**head, "mode": "search", "layouts": [], "message": message}) if args.json else message)
    return 1


def _checked(found: list, as_json: bool) -> int:
    """``--check``: the dry-run report of each layout (see :mod:`trainer.plan.check`)."""
    from .check import check_layouts, render_checks

    checks = check_layouts(found)
    print(json.dumps(checks, indent=2) if as_json else render_checks(checks))
    return 0

"""``pstate layout``: print the rank grid of a configuration, as a table or as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from .config import DEFAULT_ORDER, ParallelConfig
from .errors import ParallelConfigError
from .layout import ALL_AXES, AXIS_GROUPS, CP_SUBGROUPS, Layout, embedding_groups, layout


def describe(lay: Layout) -> dict:
    """The whole grid as plain data: config, sizes, every rank's coordinates, stages and groups."""
    split_cp = lay.config.cp_a2a > 1  # the hierarchical CP sub-groups only where CP is split
    named = {n: lay.groups(spec) for n, spec in AXIS_GROUPS.items() if split_cp or n not in CP_SUBGROUPS}
    named["embedding"] = embedding_groups(lay)
    member_of: list[dict[str, list[int]]] = [{} for _ in range(lay.world_size)]
    for name, groups in named.items():
        for group in groups:
            for r in group:
                member_of[r][name] = group
    pp, vpp = lay.config.pp, lay.config.vpp
    ranks = []
    for r in range(lay.world_size):
        coords = lay.coords(r)
        ranks.append(
            {
                "rank": r,
                "coords": coords,
                "stages": [chunk * pp + coords["pp"] for chunk in range(vpp)],
                "groups": member_of[r],
            }
        )
    return {
        "world_size": lay.world_size,
        "config": asdict(lay.config),
        "sizes": lay.sizes,
        "groups": named,
        "ranks": ranks,
    }


def render(data: dict) -> str:
    """A person-readable table of :func:`describe`'s data."""
    s, c = data["sizes"], data["config"]
    lines = [
        f"world_size={data['world_size']}  order={c['order']}  vpp={c['vpp']}",
        "decoder grid: "
        + "  ".join(f"{a}={s[a]}" for a in ("tp", "cp", "dp", "pp"))
        + (f"  cp_a2a={c['cp_a2a']}" if c.get("cp_a2a", 1) > 1 else ""),
        "expert grid:  " + "  ".join(f"{a}={s[a]}" for a in ("etp", "ep", "edp", "pp")),
        "",
    ]
    header = ["rank", *ALL_AXES, "stages"]
    rows = [
        [str(r["rank"]), *(str(r["coords"][a]) for a in ALL_AXES), ",".join(map(str, r["stages"]))]
        for r in data["ranks"]
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    for row in [header, *rows]:
        lines.append("  ".join(x.rjust(w) for x, w in zip(row, widths)))
    lines.append("")
    lines.append("groups (global ranks):")
    specs = {name: AXIS_GROUPS.get(name, "pp ends") for name in data["groups"]}
    width, spec_width = max(map(len, specs)), max(map(len, specs.values()))
    for name, groups in data["groups"].items():
        listed = " ".join("[" + ",".join(map(str, g)) + "]" for g in groups)
        lines.append(f"  {name.ljust(width)}  {specs[name].ljust(spec_width)}  {listed}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pstate", description="Parallel layout tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    lay = sub.add_parser("layout", help="print every rank's coordinates and groups for a configuration")
    lay.add_argument("--world-size", type=int, required=True)
    for name in ("tp", "pp", "vpp", "cp", "ep"):
        lay.add_argument(f"--{name}", type=int, default=1)
    lay.add_argument("--cp-a2a", type=int, default=1, help="inner all-to-all group size of hierarchical CP")
    lay.add_argument("--etp", type=int, default=None, help="expert tensor parallel size (default: tp)")
    lay.add_argument("--dp", type=int, default=None, help="data parallel size (default: derived)")
    lay.add_argument("--order", default=DEFAULT_ORDER, help=f"rank order, first axis fastest (default {DEFAULT_ORDER})")
    lay.add_argument("--json", action="store_true", help="print JSON for tools instead of a table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = ParallelConfig(
            tp=args.tp,
            pp=args.pp,
            vpp=args.vpp,
            cp=args.cp,
            ep=args.ep,
            etp=args.etp,
            dp=args.dp,
            order=args.order,
            cp_a2a=args.cp_a2a,
        )
        data = describe(layout(config, args.world_size))
    except ParallelConfigError as exc:
        print(f"pstate: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(data) if args.json else render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())

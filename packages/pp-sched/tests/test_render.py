"""``render`` / ``render_image`` and the ``pp-sched show`` command line."""

import math
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from pp_sched import build, render, render_image, simulate
from pp_sched.cli import main

# The seed's 1F1B diagram (4 stages, 8 microbatches, unit-length blocks): stage -> {label: (start, end)}.
# fmt: off
SEED = {
    0: {"F0": (0, 1), "F1": (1, 2), "F2": (2, 3), "F3": (3, 4),
        "B3": (7, 8), "B2": (8, 9), "B1": (9, 10), "B0": (10, 11)},
    1: {"F0": (1, 2), "F1": (2, 3), "F2": (3, 4), "F3": (4, 5),
        "B3": (6, 7), "B2": (7, 8), "B1": (8, 9), "B0": (9, 10)},
    2: {"F0": (2, 3), "F1": (3, 4), "F2": (4, 5), "F3": (5, 6),
        "B3": (5, 6), "B2": (6, 7), "B1": (7, 8), "B0": (8, 9)},
    3: {"F0": (3, 4), "F1": (4, 5), "F2": (5, 6), "F3": (6, 7),
        "B3": (4, 5), "B2": (5, 6), "B1": (6, 7), "B0": (7, 8)},
}
# fmt: on

# What `render` prints for 1F1B at pp=4, microbatches=8 with unit forward and backward.
ONE_F_ONE_B = """\
rank 0 F0 F1 F2 F3 .  .  .  B0 F4 B1 F5 B2 F6 B3 F7 B4 .  B5 .  B6 .  B7
rank 1 .  F0 F1 F2 .  .  B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5 .  B6 .  B7 .
rank 2 .  .  F0 F1 .  B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 .  B7 .  .
rank 3 .  .  .  F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7 .  .  ."""


def test_the_seed_1f1b_diagram_is_reproduced_where_it_is_consistent():
    """The seed draws its warmup forwards and each stage's first backward where 1F1B runs them. Its other
    blocks cannot be drawn by any schedule: stage 3 runs F1 and B3 both in 4-5, F3 of stage 3 ends after
    its B3, and the backward labels run 3..0. Its warmup forwards and first-backward times are checked,
    and the whole 1F1B order is pinned by the rendered chart below."""
    sim = simulate(build("1f1b", pp=4, microbatches=8), forward=1, backward=1)
    for stage, blocks in SEED.items():
        slots = {slot.action.label: (slot.start, slot.end) for slot in sim.timelines[stage]}
        for j in range(4 - stage):  # warmup plus the first steady forward
            assert slots[f"F{j}"] == blocks[f"F{j}"]
        first_backward = min(blocks[label] for label in blocks if label.startswith("B"))
        assert slots["B0"] == first_backward == (7 - stage, 8 - stage)
    text = render(sim)
    assert "\n".join(text.splitlines()[2:6]) == ONE_F_ONE_B


def test_text_chart_has_a_row_per_rank_and_marks_kinds_and_idle_time():
    text = render(build("1f1b", pp=4, microbatches=8))
    lines = text.splitlines()
    assert lines[0] == "1f1b: pp=4 vpp=1 microbatches=8"
    assert lines[1].startswith("time   0  1  2")
    assert lines[2].startswith("rank 0 F0 F1 F2 F3 .  .  .  .  .  .  B0--- F4 B1---")
    assert [line.split()[1] for line in lines[2:6]] == ["0", "1", "2", "3"]
    assert lines[-1].startswith("F forward, B backward; . idle")


def test_text_chart_of_split_and_interleaved_schedules():
    zb = render(build("zero-bubble", pp=2, microbatches=2))
    assert "I0" in zb and "W1" in zb and "I input gradient, W weight gradient" in zb
    interleaved = render(build("interleaved-1f1b", pp=2, microbatches=2, vpp=2))
    assert "F0c1" in interleaved and "cN = chunk N" in interleaved
    assert "one column = 0.5 time units" in interleaved


def test_render_takes_a_simulation_or_a_schedule_with_costs():
    schedule = build("gpipe", pp=3, microbatches=3)
    assert render(schedule, forward=2, backward=3) == render(simulate(schedule, 2, 3))


def test_costs_without_a_common_step_are_drawn_rounded():
    text = render(build("1f1b", pp=2, microbatches=3), backward=math.pi)
    assert len(text.splitlines()[2]) < 2000 * 4
    assert text.endswith("times rounded")
    assert render(build("1f1b", pp=2, microbatches=3), forward=1.1, backward=2.3).endswith("times rounded")
    assert not render(build("1f1b", pp=2, microbatches=3), backward=1.5).endswith("times rounded")
    assert render(build("1f1b", pp=2, microbatches=3), comm=0.25).endswith("one column = 0.25 time units")


@pytest.mark.parametrize("suffix", ["svg", "png"])
def test_render_image_writes_the_file(tmp_path, suffix):
    pytest.importorskip("matplotlib")
    out = render_image(build("interleaved-1f1b", pp=4, microbatches=8, vpp=2), tmp_path / f"chart.{suffix}")
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG") if suffix == "png" else b"<svg" in data


def test_cli_prints_chart_bubble_and_peak_and_writes_svg(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "chart.svg"
    argv = ["show", "--schedule", "1f1b", "--pp", "4", "--microbatches", "8", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "rank 3 .  .  .  F0 B0---" in printed
    assert "bubble fraction: 0.2727 (27.3%)" in printed
    assert "peak activations (microbatch-chunks held): rank 0: 4, rank 1: 3, rank 2: 2, rank 3: 1" in printed
    assert b"<svg" in out.read_bytes()


def test_cli_interleaved_and_costs(capsys):
    argv = ["show", "--schedule", "interleaved-1f1b", "--pp", "4", "--microbatches", "8", "--vpp", "2"]
    assert main([*argv, "--forward", "1", "--backward", "2", "--comm", "0"]) == 0
    assert "bubble fraction: 0.1579" in capsys.readouterr().out
    assert main(["show", "--schedule", "zero-bubble", "--pp", "4", "--microbatches", "8", "--weight", "0.5"]) == 0
    assert "makespan:" in capsys.readouterr().out


def test_cli_refuses_invalid_schedules_with_the_rule(capsys):
    argv = ["show", "--schedule", "interleaved-1f1b", "--pp", "4", "--microbatches", "6", "--vpp", "2"]
    assert main(argv) == 2
    assert "pp-sched: error: interleaved-1f1b needs microbatches % group_size" in capsys.readouterr().err
    assert main(["show", "--schedule", "gpipe", "--pp", "2", "--microbatches", "2", "--vpp", "2"]) == 2


def test_cli_runs_as_a_process_and_is_installed_as_a_script():
    result = subprocess.run(
        [sys.executable, "-m", "pp_sched.cli", "show", "--schedule", "gpipe", "--pp", "2", "--microbatches", "2"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "bubble fraction: 0.3333" in result.stdout
    assert any(ep.value == "pp_sched.cli:main" for ep in entry_points(group="console_scripts", name="pp-sched"))


def test_without_matplotlib_the_image_is_refused_with_the_extra_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'pp-sched\[plot\]'"):
        render_image(build("1f1b", pp=2, microbatches=2), tmp_path / "chart.svg")
    argv = ["show", "--schedule", "1f1b", "--pp", "2", "--microbatches", "2", "--out", str(tmp_path / "c.svg")]
    assert main(argv) == 2
    assert "render_image needs matplotlib" in capsys.readouterr().err

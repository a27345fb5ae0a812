"""``pstate layout``: a table for people, JSON for tools, a clear error for a bad configuration."""

import json
import subprocess
import sys

from pstate import ParallelConfig, layout
from pstate.cli import main


def test_table_lists_every_rank_and_group(capsys):
    assert main(["layout", "--world-size", "8", "--tp", "2", "--pp", "2", "--vpp", "2", "--ep", "2"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "world_size=8  order=tp-cp-ep-dp-pp  vpp=2"
    assert lines[1] == "decoder grid: tp=2  cp=1  dp=2  pp=2"
    assert lines[2] == "expert grid:  etp=2  ep=2  edp=1  pp=2"
    assert lines[4].split() == ["rank", "tp", "cp", "dp", "pp", "etp", "ep", "edp", "stages"]
    assert lines[5 + 6].split() == ["6", "0", "0", "1", "1", "0", "1", "0", "1,3"]
    assert any(
        line.split()[:2] == ["pp", "pp"] and line.split()[2:] == ["[0,4]", "[1,5]", "[2,6]", "[3,7]"] for line in lines
    )


def test_table_names_the_hierarchical_cp_split(capsys):
    assert main(["layout", "--world-size", "4", "--cp", "4", "--cp-a2a", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "decoder grid: tp=1  cp=4  dp=1  pp=1  cp_a2a=2"
    assert any(line.split() == ["cp_a2a", "cp_a2a", "[0,1]", "[2,3]"] for line in lines)
    assert any(line.split() == ["cp_ring", "cp_ring", "[0,2]", "[1,3]"] for line in lines)


def test_json_matches_the_layout(capsys):
    assert main(["layout", "--world-size", "16", "--tp", "2", "--cp", "2", "--pp", "2", "--ep", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    lay = layout(ParallelConfig(tp=2, cp=2, pp=2, ep=2), 16)
    assert data["sizes"] == lay.sizes
    assert data["groups"]["dp_cp"] == lay.groups("cp-dp")
    assert data["groups"]["etp_ep"] == lay.groups("etp-ep")
    for entry in data["ranks"]:
        assert entry["coords"] == lay.coords(entry["rank"])
        assert entry["groups"]["tp"] == lay.group_of(entry["rank"], "tp")
        assert entry["stages"] == [entry["coords"]["pp"]]


def test_bad_config_exits_2_with_the_rule():
    cmd = [sys.executable, "-m", "pstate.cli", "layout", "--world-size", "8", "--tp", "3"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stdout == ""
    assert "tp*cp*pp=3 (tp=3, cp=1, pp=1) does not divide world_size=8" in out.stderr

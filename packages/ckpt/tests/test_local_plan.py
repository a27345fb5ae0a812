"""Save plans each rank derives alone from the layout (``local_plan``) against the plans of the exchange
(``plan`` over every rank's description), on every rank of a matrix of simulated layouts; the fixed-size
agreement sum accepts consistent holders and refuses wrong ones; a real save with wrong replicas falls
back to the exchange and still writes the right checkpoint. Load plans: the bisection lookup finds
exactly the copies a scan over every saved piece finds, for resharding loads. All exact."""

import importlib.util
import json
import random
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import ckpt
from ckpt.agree import vector, verdict
from ckpt.plan import assemble, local_plan, plan
from ckpt.regions import BoxIndex, boxes, intersect
from pstate import Shard

_spec = importlib.util.spec_from_file_location("ckpt_simulated", Path(__file__).with_name("simulated.py"))
_simulated = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_simulated)
simulate = _simulated.simulate

MATRIX = [(1, 1, 4, False), (2, 1, 8, False), (2, 2, 8, True), (4, 2, 16, False), (2, 4, 32, True), (8, 1, 64, True)]


@pytest.mark.parametrize("tp, pp, world, zero", MATRIX)
def test_local_plans_equal_the_exchange_on_every_rank(tp, pp, world, zero):
    ranks = simulate(tp, pp, world, zero=zero)
    docs = [doc for doc, _ in ranks]
    local = [local_plan(doc, held, r) for r, (doc, held) in enumerate(ranks)]
    exchanged = [plan(docs, r) for r in range(world)]
    for r in range(world):
        assert not local[r].errors and not exchanged[r].errors
        assert local[r].writes == exchanged[r].writes, r
        assert local[r].fragment == exchanged[r].fragment, r
    index, conflicts = assemble([p.fragment for p in local])
    assert not conflicts
    written = [p for head in index["tensors"].values() for p in head["pieces"]]
    assert len({(p["file"], p["name"]) for p in written}) == len(written)  # every stored name once
    assert len({p["file"] for p in written}) == world  # replicated pieces spread over all the ranks
    total = [sum(col) for col in zip(*(vector(d, h, r, "abcdefabcdef" if r == 0 else None, 0)
                                       for r, (d, h) in enumerate(ranks)))]  # fmt: skip
    assert verdict(total, world) == (True, "abcdefabcdef")


def test_wrong_holders_or_values_are_refused_by_the_sum():
    ranks = simulate(2, 1, 8, zero=False)
    world = len(ranks)

    def agreed(rows):
        total = [sum(col) for col in zip(*(vector(d, h, r, "t" * 12 if r == 0 else None, 0) for r, (d, h) in rows))]
        return verdict(total, world)[0]

    assert agreed(list(enumerate(ranks)))
    doc, held = ranks[3]
    wrong = dict(held)
    name = next(n for n in held if n.endswith("norm1"))
    wrong[name] = tuple(r for r in held[name] if r != 5)  # rank 3 forgets that rank 5 holds it too
    assert not agreed([(r, (doc, wrong) if r == 3 else x) for r, x in enumerate(ranks)])
    other = {**doc, "values": {**doc["values"], "progress/step": 8}}
    assert not agreed([(r, (other, held) if r == 3 else x) for r, x in enumerate(ranks)])


def save_with_replicas(path, claim_all):
    rank = dist.get_rank()
    state = {"w": Shard(torch.full((2, 3), float(rank)), (4, 3), (2 * rank, 0)), "b": torch.arange(5.0), "step": 3}

    def replicas(name, shard):
        return [0, 1] if claim_all or name == "b" else [rank]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt.save(state, path, replicas=replicas)
    loaded = ckpt.load({"w": Shard(torch.zeros(4, 3), (4, 3), (0, 0)), "b": torch.zeros(5), "step": 0}, path)
    return [str(w.message) for w in caught], loaded["w"].data.tolist(), loaded["b"].tolist()


def test_wrong_replicas_fall_back_to_the_exchange_with_a_warning(run_ranks, tmp_path):
    good = run_ranks(2, save_with_replicas, str(tmp_path / "good"), False)
    bad = run_ranks(2, save_with_replicas, str(tmp_path / "bad"), True)  # "w" differs: not replicated
    assert good[0][0] == [] and good[1][0] == []
    assert "planned by exchanging descriptions" in bad[0][0][0] and "'w'" in bad[0][0][0]
    for _, w, b in good + bad:
        assert w == [[0.0] * 3] * 2 + [[1.0] * 3] * 2 and b == [0.0, 1.0, 2.0, 3.0, 4.0]
    for name in ("good", "bad"):
        assert json.loads((tmp_path / name / "index.json").read_text())["values"] == {"step": 3}


def scan(saved, want):
    """The copies a scan over every saved box finds (what ``load`` did before the lookup)."""
    return [(p, b, c) for p, b in saved for c in [intersect(want, b)] if c is not None]


@pytest.mark.parametrize("seed", range(4))
def test_the_lookup_finds_what_a_scan_finds_in_resharding_loads(seed):
    rng = random.Random(seed)
    ranks = simulate(2, 2, 8, zero=True)  # saved at TP2 x PP2 x DP2 with ZeRO flat ranges
    index, conflicts = assemble([local_plan(doc, held, r).fragment for r, (doc, held) in enumerate(ranks)])
    assert not conflicts
    target = simulate(4, 1, 16, zero=rng.random() < 0.5)  # loaded at TP4 x DP4, ZeRO or not
    checked = 0
    for doc, _ in target:
        for name, meta in doc["tensors"].items():
            head = index["tensors"][name]
            saved = [
                (p["file"] + p["name"], b)
                for p in head["pieces"]
                for b in boxes(p["offsets"], p["shape"], p["flat_range"])
            ]
            lookup = BoxIndex(saved)
            for want in boxes(meta["offsets"], meta["shape"], meta["flat_range"]):
                assert lookup.meeting(want) == scan(saved, want)
                checked += 1
    assert checked > 1000

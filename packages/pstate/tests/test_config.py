"""``ParallelConfig`` and ``layout`` refuse every configuration that cannot work, naming the rule."""

import pytest

from pstate import ParallelConfig, ParallelConfigError, layout


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tp": 0}, "tp=0 must be >= 1"),
        ({"pp": -2}, "pp=-2 must be >= 1"),
        ({"cp": 0}, "cp=0 must be >= 1"),
        ({"ep": 0}, "ep=0 must be >= 1"),
        ({"etp": 0}, "etp=0 must be >= 1"),
        ({"dp": 0}, "dp=0 must be >= 1"),
        ({"vpp": 0}, "vpp=0 must be >= 1"),
        ({"tp": 2.0}, "tp=2.0 must be an integer"),
        ({"tp": True}, "tp=True must be an integer"),
        ({"order": "tp-xp-dp"}, "unknown axis 'xp'"),
        ({"order": "tp-dp-tp"}, "repeats axis tp"),
        ({"tp": 2, "order": "cp-dp-pp"}, "tp=2 is > 1 but axis 'tp' is missing"),
        ({"ep": 4, "order": "tp-dp-pp"}, "ep=4 is > 1 but axis 'ep' is missing"),
        ({"dp": 2, "order": "tp-pp"}, "dp=2 is > 1 but axis 'dp' is missing"),
        ({"vpp": 2}, "vpp=2 needs pipeline parallelism, but pp=1"),
    ],
)
def test_config_rules(kwargs, message):
    with pytest.raises(ParallelConfigError, match=message.replace("(", r"\(")):
        ParallelConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "world", "message"),
    [
        ({"tp": 3}, 8, r"tp\*cp\*pp=3 \(tp=3, cp=1, pp=1\) does not divide world_size=8"),
        ({"tp": 2, "cp": 2, "pp": 4}, 8, r"tp\*cp\*pp=16 .* does not divide world_size=8"),
        ({"tp": 2, "dp": 2}, 8, r"dp=2 is inconsistent: tp\*cp\*dp\*pp=4 .* must equal world_size=8"),
        ({"ep": 4}, 6, r"etp\*ep\*pp=4 \(etp=1, ep=4, pp=1\) does not divide world_size=6"),
        ({"tp": 2, "ep": 4}, 4, r"etp\*ep\*pp=8 .* does not divide world_size=4"),
        ({"etp": 4, "ep": 4}, 8, r"etp\*ep\*pp=16"),
        ({"order": "tp-pp"}, 4, r"dp=4 is > 1 but axis 'dp' is missing"),
        ({"tp": 2, "etp": 1, "order": "tp-pp"}, 2, r"edp=2 is > 1 but axis 'dp' .* is missing"),
        ({}, 0, r"world_size=0 must be an integer >= 1"),
    ],
)
def test_layout_rules(kwargs, world, message):
    config = ParallelConfig(**kwargs)
    with pytest.raises(ParallelConfigError, match=message):
        layout(config, world)


def test_pipeline_groups_of_the_two_grids_must_agree():
    # pp placed before dp: with tp=2 but etp=1 the pipeline stride differs between the grids.
    config = ParallelConfig(tp=2, pp=2, etp=1, ep=2, order="tp-pp-ep-dp-cp")
    with pytest.raises(ParallelConfigError, match="different pipeline groups"):
        layout(config, 8)
    # The same sizes in the default order are fine.
    assert layout(ParallelConfig(tp=2, pp=2, etp=1, ep=2), 8).groups("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_defaults_and_normalisation():
    config = ParallelConfig(tp=4, order="TP-CP-EP-DP-PP")
    assert config.etp == 4
    assert config.order == "tp-cp-ep-dp-pp"
    assert ParallelConfig(order="dp-tp").full_order == ("dp", "tp", "cp", "ep", "pp")
    with pytest.raises(AttributeError):
        config.tp = 2  # frozen


@pytest.mark.parametrize("axes", ["tp-xx", "tp-tp", "tp-ep", "cp-edp", "dp-etp", ""])
def test_bad_axes_strings(axes):
    with pytest.raises(ParallelConfigError, match="axes="):
        layout(ParallelConfig(tp=2, ep=2), 8).groups(axes)


def test_rank_outside_world():
    lay = layout(ParallelConfig(tp=2), 4)
    for rank in (-1, 4):
        with pytest.raises(ParallelConfigError, match=f"rank={rank} is outside world_size=4"):
            lay.coords(rank)


def test_pipeline_layout_names_the_layers_of_every_virtual_stage():
    assert ParallelConfig(pp=2, vpp=2, pipeline_layout=[0, 3, 3, 2]).pipeline_layout == (0, 3, 3, 2)
    assert ParallelConfig(pp=2).pipeline_layout is None
    with pytest.raises(ParallelConfigError, match=r"names 3 stages but pp\*vpp=2"):
        ParallelConfig(pp=2, pipeline_layout=[1, 1, 1])
    with pytest.raises(ParallelConfigError, match=r"pipeline_layout\[0\]=-1 must be an integer >= 0"):
        ParallelConfig(pp=2, pipeline_layout=[-1, 3])
    with pytest.raises(ParallelConfigError, match="must be a list"):
        ParallelConfig(pp=2, pipeline_layout="3,1")


def test_cp_a2a_divides_cp():
    assert ParallelConfig(cp=4, cp_a2a=2).cp_a2a == 2 and ParallelConfig(cp=4).cp_a2a == 1
    with pytest.raises(ParallelConfigError, match="cp_a2a=3 must divide cp=4"):
        ParallelConfig(cp=4, cp_a2a=3)
    with pytest.raises(ParallelConfigError, match="cp_a2a=0 must be >= 1"):
        ParallelConfig(cp=4, cp_a2a=0)

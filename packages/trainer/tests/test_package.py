"""Package-level contracts of `trainer`."""

from pstate.testing.contracts import loaded_project_packages


def test_imports_only_the_packages_below_it():
    assert loaded_project_packages("trainer") <= {
        "cp_ring",
        "moe_dispatch",
        "dp_shard",
        "pp_sched",
        "pstate",
        "tp_layers",
        "ckpt",
    }

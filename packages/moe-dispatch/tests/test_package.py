"""Package-level contracts of `moe_dispatch`."""

from pstate.testing.contracts import loaded_project_packages


def test_imports_only_the_packages_below_it():
    assert loaded_project_packages("moe_dispatch") <= {"pstate", "tp_layers"}

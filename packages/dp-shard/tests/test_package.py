"""Package-level contracts of `dp_shard`."""

from pstate.testing.contracts import loaded_project_packages


def test_imports_only_the_packages_below_it():
    assert loaded_project_packages("dp_shard") <= {"pstate"}

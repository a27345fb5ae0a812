"""Package-level contracts of `pp_sched`."""

from pstate.testing.contracts import loaded_project_packages


def test_imports_only_the_packages_below_it():
    assert loaded_project_packages("pp_sched") <= {"pstate"}

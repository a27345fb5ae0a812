"""Package-level contracts of `pstate`."""

from pstate.testing.contracts import loaded_project_packages


def test_imports_no_other_project_package():
    assert loaded_project_packages("pstate") == set()

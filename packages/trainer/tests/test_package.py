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


def test_public_names_load_on_first_use():
    import trainer
    import trainer.generate
    import trainer.train

    assert callable(trainer.train.train) and callable(trainer.generate.generate)
    assert trainer.preset("tiny").layers == 4
    assert set(trainer.__all__) == {
        "ModelConfig",
        "RunConfig",
        "TrainerError",
        "check_run",
        "load_run_config",
        "preset",
    }

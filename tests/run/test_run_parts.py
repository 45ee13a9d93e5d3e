"""Unit tests of the run's rooms that had none (issue 47, item 8): what a resume compares
(:mod:`fcmae.run.resume_checks`), the rank-0 decision (:mod:`fcmae.run.ranks`), the Hydra callback's
checks before the run directory exists (:mod:`fcmae.run.hydra_checks`)."""
import pytest
from omegaconf import OmegaConf

from fcmae.config import ConfigError
from fcmae.config.resume_rules import APPLY, FREE, PRETRAIN, REFUSE
from fcmae.distributed import DistInfo
from fcmae.run.ranks import on_every_rank, on_rank_zero
from fcmae.run.resume_checks import changes, leaves


def test_leaves_flatten_a_nested_config_and_keep_lists_whole():
    assert leaves({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": 1, "a.c": [1, 2], "d": None}


def test_changes_sorts_each_differing_key_by_its_rule_and_skips_keys_the_checkpoint_lacks():
    old = {"trainer": {"seed": 0, "log_every": 10}, "optim": {"weight_decay": 0.05, "betas": [0.9, 0.95]},
           "model": {"mask_ratio": 0.6}}
    new = {"trainer": {"seed": 1, "log_every": 50, "new_key": 3}, "optim": {"weight_decay": 0.05,
           "betas": [0.9, 0.99]}, "model": {"mask_ratio": 0.75}}
    got = changes(old, new, PRETRAIN)
    assert got[REFUSE] == [("model.mask_ratio", 0.6, 0.75), ("trainer.seed", 0, 1)]
    assert got[APPLY] == [("optim.betas", [0.9, 0.95], [0.9, 0.99])]
    assert got[FREE] == [("trainer.log_every", 10, 50)]
    assert "trainer.new_key" not in str(got)  # an older checkpoint does not record it: not a change
    # OmegaConf lists compare by value
    assert not changes({"optim": {"betas": [0.9, 0.95]}}, {"optim": {"betas": OmegaConf.create([0.9, 0.95])}},
                       PRETRAIN)


def test_one_process_decides_and_loads_alone_and_its_errors_are_its_own():
    info = DistInfo()
    assert on_rank_zero(lambda: ("path", 3), info) == ("path", 3)
    assert on_every_rank(lambda: 7, info, "x") == 7

    def refuse():
        raise ConfigError("no")
    with pytest.raises(ConfigError, match="no"):
        on_rank_zero(refuse, info)


def test_the_hydra_callback_refuses_a_bad_value_before_the_run_directory_exists(tmp_path, capsys):
    from fcmae.run.hydra_checks import RunDirectoryChecks
    from test_pretrain import make_cfg

    cfg = OmegaConf.create(OmegaConf.to_container(make_cfg("model.mask_ratio=1.5")))
    run_dir = tmp_path / "never-made"
    cfg.hydra = {"run": {"dir": str(run_dir)}}
    with pytest.raises(SystemExit) as stop:
        RunDirectoryChecks("pretrain").on_run_start(cfg)
    assert stop.value.code == 1 and "model.mask_ratio" in capsys.readouterr().err
    assert not run_dir.exists()
    cfg.model.mask_ratio = 0.6  # a good config passes (the writability probe makes the directory)
    RunDirectoryChecks("pretrain").on_run_start(cfg)
    assert run_dir.is_dir() and not any(run_dir.iterdir())

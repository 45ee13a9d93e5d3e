"""Run directory names hold exactly what changes the trained weights (#33 item 2)."""
import dataclasses

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from fcmae import config as C
from fcmae.pretrain import run

from test_pretrain import TINY

APPS = {
    "pretrain": (C.PretrainConfig, C.PRETRAIN_UNTRAINED_KEYS | C.PRETRAIN_PATH_KEYS, set()),
    "finetune": (C.FinetuneConfig, C.FINETUNE_UNTRAINED_KEYS | C.FINETUNE_PATH_KEYS, {"model.name"}),
}


def _leaf_keys(schema, prefix=""):
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _leaf_keys(type(default), f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


@pytest.mark.parametrize("app", sorted(APPS))
def test_every_key_is_classified_and_the_yaml_agrees(app):
    schema, unnamed, in_run_name = APPS[app]
    with open(f"{C.CONFIG_PATH}/{app}.yaml") as f:
        excluded = set(yaml.safe_load(f)["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"])
    keys = set(_leaf_keys(schema))
    groups = {k for k in excluded if "." not in k and k not in keys}  # logger, launcher, model, experiment, ...
    # The name leaves out exactly the keys classified as changing nothing trained, paths, and those
    # run_name itself holds; every other schema key names the run directory.
    assert excluded - groups <= keys, f"exclude_keys names keys the schema lacks: {sorted(excluded - groups - keys)}"
    assert excluded - groups == unnamed | in_run_name, sorted((excluded - groups) ^ (unnamed | in_run_name))


def _run_dir(overrides, app="pretrain"):
    """``(the run directory Hydra would use, the job's config)`` for an app and its overrides."""
    with initialize_config_dir(config_dir=C.CONFIG_PATH, version_base=None):
        full = compose(app, overrides=overrides, return_hydra_config=True)
        cfg = compose(app, overrides=overrides)
    HydraConfig.instance().set_config(full)
    return OmegaConf.select(full, "hydra.run.dir"), cfg


def test_init_from_names_the_run_and_checkpoint_cadence_does_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plain, cfg = _run_dir([*TINY, "trainer.max_steps=1"])
    run(cfg, plain)
    cadence, _ = _run_dir([*TINY, "trainer.max_steps=1", "trainer.ckpt_every=2", "trainer.keep_checkpoints=3",
                           "trainer.vis_every=5"])
    assert cadence == plain  # before: a new directory data.img_size:64+...+trainer.ckpt_every:2
    init, cfg = _run_dir([*TINY, "trainer.max_steps=1", f"init_from={plain}"])
    assert init != plain and "-from-" in init
    run(cfg, init)
    # Before: the plain command after the init_from one was refused ("init_from: ... -> None").
    again, cfg = _run_dir([*TINY, "trainer.max_steps=2"])
    assert again == plain and run(cfg, again).step == 2


def test_fine_tune_tags_come_from_the_source_runs_name(tmp_path):
    source = tmp_path / "outputs" / "convnextv2_atto-imagefolder" / "data.batch_size:128+data.img_size:64"
    (source / "checkpoints").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"run_name": "convnextv2_atto-imagefolder"}), source / "config.yaml")
    assert C.init_tag(str(source)) == "from-convnextv2_atto-imagefolder+data.batch_size:128+data.img_size:64"
    demo = tmp_path / "outputs" / "convnextv2_atto-synthetic"
    (demo / "checkpoints").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"run_name": "convnextv2_atto-synthetic"}), demo / "config.yaml")
    assert C.init_tag(str(demo)) == "from-convnextv2_atto-synthetic"
    assert C.init_tag(str(demo / "checkpoints" / "last.pt")) == "from-convnextv2_atto-synthetic"
    assert C.init_tag("exports/atto.safetensors") == "from-atto"
    assert C.init_suffix(None) == "" and C.init_suffix("atto.safetensors") == "-from-atto"

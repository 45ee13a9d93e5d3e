"""Run directories a user can pass back to us, and what is (not) part of their names."""
import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from fcmae.config import CONFIG_PATH, EvalConfig, LauncherConfig, LoggerConfig, init_tag, run_subdir, safe_dirname
from fcmae.pretrain import run

from test_pretrain import make_cfg


def _excluded(app: str) -> set[str]:
    cfg = yaml.safe_load((Path(CONFIG_PATH) / f"{app}.yaml").read_text())
    return set(cfg["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"])


@pytest.mark.parametrize("app", ["pretrain", "finetune"])
def test_every_launcher_and_logger_key_stays_out_of_the_directory_name(app):
    excluded = _excluded(app)
    groups = [("launcher", LauncherConfig), ("logger", LoggerConfig)]
    if app == "pretrain":
        groups.append(("eval", EvalConfig))
    for prefix, schema in groups:
        missing = {f"{prefix}.{f.name}" for f in dataclasses.fields(schema)} - excluded
        assert not missing, f"{app}: {sorted(missing)} would change the run directory"
    assert "eval_only" in excluded


def test_created_paths_pass_back_unquoted(tmp_path):
    name = safe_dirname("data.crop_scale=[0.35,1.0],model.mask_ratio=0.4,data.img_size=64")
    assert name == "data.crop_scale:0.35+1.0+model.mask_ratio:0.4+data.img_size:64"
    parser = OverridesParser.create()
    for key in ("resume", "init_from", "model.init_from"):
        value = f"outputs/convnextv2_atto-synthetic/{name}/checkpoints/last.pt"
        assert parser.parse_override(f"{key}={value}").value() == value
    # an older key=value,... directory is still found, so its run resumes
    old = tmp_path / "model.mask_ratio=0.4"
    old.mkdir()
    assert run_subdir(str(tmp_path), "model.mask_ratio=0.4") == "model.mask_ratio=0.4"
    assert run_subdir(str(tmp_path), "model.mask_ratio=0.5") == "model.mask_ratio:0.5"


def test_finetune_inits_get_their_own_run_names():
    assert init_tag(None) == "scratch"
    assert init_tag("atto.safetensors") == "from-atto"
    assert init_tag("outputs/convnextv2_atto-synthetic/") == "from-convnextv2_atto-synthetic"


EVAL = ["eval=knn", "eval.synthetic_train_images=16", "eval.synthetic_val_images=8", "eval.num_workers=0",
        "eval.k=3", "eval.batch_size=8"]


def test_pretrain_eval_only_scores_a_finished_run_beside_it(tmp_path):
    run(make_cfg("trainer.max_steps=2"), tmp_path)
    scores = run(make_cfg("trainer.max_steps=2", "eval_only=true", *EVAL), tmp_path)
    assert 0.0 <= scores["eval/knn_top1"] <= 100.0
    (line,) = (tmp_path / "evals.jsonl").read_text().splitlines()
    rec = json.loads(line)
    assert rec["step"] == 2 and rec["eval"] == "knn" and rec["eval/knn_top1"] == scores["eval/knn_top1"]
    from fcmae.config import ConfigError
    with pytest.raises(ConfigError, match="eval_only=true scores a run"):
        run(make_cfg("eval_only=true"), tmp_path)


def test_finetune_eval_only_needs_only_the_val_set(tmp_path):
    from hydra import compose, initialize_config_dir
    from fcmae.run.validation import validate_finetune
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base=None):
        cfg = compose("finetune", overrides=["eval_only=true", "data.source=imagefolder", f"data.val_root={tmp_path}",
                                             "model.init_from=x"])
    validate_finetune(cfg)  # no data.train_root asked for


@pytest.mark.parametrize("source", ["imagefolder", "folder", "filelist", "fashion_mnist"])
def test_real_data_gets_the_paper_lr_rule_not_the_demo_lr(source, tmp_path):
    from hydra import compose, initialize_config_dir
    from fcmae.distributed import DistInfo
    from fcmae.run.resume import prepare_run
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base=None):
        demo = compose("pretrain")
        real = compose("pretrain", overrides=[f"data={source}", f"data.root={tmp_path}", "data.batch_size=128"])
    assert prepare_run(real, tmp_path / "a", DistInfo()).base_lr == pytest.approx(1.5e-4 * 128 / 256)  # 7.5e-5
    assert (real.trainer.epochs, real.schedule.warmup_epochs) == (800, 40)
    assert prepare_run(demo, tmp_path / "b", DistInfo()).base_lr == pytest.approx(3e-2 * 8 / 256)  # the demo's own


def test_compile_auto_is_on_for_cuda_and_off_for_cpu():
    import torch
    from fcmae.run.assembly import resolve_compile
    assert resolve_compile("auto", torch.device("cuda")) and not resolve_compile("auto", torch.device("cpu"))
    assert resolve_compile(True, torch.device("cpu")) and not resolve_compile(False, torch.device("cuda"))
    from hydra import compose, initialize_config_dir
    from fcmae.config import ConfigError
    from fcmae.run.validation import validate
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base=None):
        assert compose("pretrain").trainer.compile == "auto"
        with pytest.raises(ConfigError, match="trainer.compile='maybe'"):
            validate(compose("pretrain", overrides=["trainer.compile=maybe"]))


def test_finetune_reads_labelled_file_lists_and_matches_val_classes_by_name(tmp_path):
    from hydra import compose, initialize_config_dir
    from PIL import Image
    from fcmae.data.image_io import DataError
    from fcmae.data.sources import read_labelled_list
    from fcmae.finetune import run as finetune_run
    (tmp_path / "img").mkdir()
    lines = []
    for i in range(16):
        Image.new("RGB", (72, 72), (i * 15, 80, 40)).save(tmp_path / "img" / f"{i}.png")
        lines.append(f"img/{i}.png {('cat', 'dog', 'fox')[i % 3]}")
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "val.txt").write_text("# val holds two of the classes\nimg/1.png dog\nimg/2.png fox\n")
    train = read_labelled_list(tmp_path / "train.txt")
    val = read_labelled_list(tmp_path / "val.txt", train.classes)
    assert train.classes == ["cat", "dog", "fox"] and val.labels == [1, 2]
    (tmp_path / "bad.txt").write_text("img/1.png owl\n")
    with pytest.raises(DataError, match="'owl'"):
        read_labelled_list(tmp_path / "bad.txt", train.classes)
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base=None):
        cfg = compose("finetune", overrides=[
            "data.source=filelist", f"data.train_root={tmp_path / 'train.txt'}", f"data.val_root={tmp_path / 'val.txt'}",
            "data.img_size=64", "data.batch_size=4", "data.num_workers=0", "trainer.max_steps=2",
            "trainer.progress=log"])
    state = finetune_run(cfg, tmp_path / "run")
    assert state.step == 2
    from fcmae.storage.checkpoint import load_checkpoint
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["classes"] == ["cat", "dog", "fox"]

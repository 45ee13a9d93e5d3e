"""What a user sees (#33): wandb without an account, progress on long phases, no stray or empty
run directories, shards that remember where their images came from."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import fcmae.loggers as loggers
from fcmae.pretrain import run

from test_pretrain import make_cfg, metrics

ROOT = Path(__file__).resolve().parents[2]


def _clean_env(home: Path) -> dict:
    """No wandb settings at all: no WANDB_* variables, an empty home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k not in ("NETRC", "XDG_CONFIG_HOME")}
    env.update(HOME=str(home), PYTHONPATH=str(ROOT))
    return env


def _app(args, cwd, env=None, app="fcmae.pretrain"):
    return subprocess.run([sys.executable, "-m", app, *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env=env)


@pytest.mark.slow
def test_wandb_logs_offline_with_no_account_key_or_settings(tmp_path):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    logger = "wandb+tensorboard"  # wandb's path is the same alone (logger=wandb); this covers both loggers
    home = tmp_path / "home"
    home.mkdir()
    run_dir = tmp_path / "run"
    proc = _app([f"logger={logger}", "data.img_size=64", "data.batch_size=4", "data.num_workers=0",
                 "data.synthetic_images=8", "model.decoder_embed_dim=32", "trainer.max_steps=2", "trainer.log_every=1",
                 f"hydra.run.dir={run_dir}"], tmp_path, _clean_env(home))
    assert proc.returncode == 0, proc.stderr[-2000:]  # before: UsageError: No API key configured
    out = proc.stdout + proc.stderr
    assert "wandb cannot log online" in out and "logging offline" in out and "wandb sync" in out
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # The run's records (protobuf in wandb's log format) carry the metric names and values we logged.
    data = next(runs[0].glob("*.wandb")).read_bytes()
    assert b"train/loss" in data and b"train/lr" in data
    assert str(metrics(run_dir)[-1]["loss"])[:6].encode() in data


def test_long_phases_log_progress_with_rate_and_time_left(caplog, monkeypatch):
    from fcmae.evaluation import extract_features
    from fcmae.models.fcmae import FCMAE
    monkeypatch.setattr(loggers, "PHASE_LOG_EVERY_S", 0.0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    encoder = FCMAE(depths=[1, 1, 1, 1], dims=[8, 16, 24, 32], decoder_embed_dim=16).encoder
    loader = [(torch.randn(2, 3, 64, 64), torch.tensor([0, 1]), torch.tensor([True, True])) for _ in range(3)]
    with caplog.at_level("INFO", logger="fcmae"):
        feats, labels = extract_features(encoder, loader, torch.device("cpu"), what="eval val features")
    assert feats.shape == (6, 32)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval val features")]
    assert lines[0].startswith("eval val features: 1/3 batches (") and "/s" in lines[0] and "left" in lines[0]
    assert lines[-1].startswith("eval val features: done, 3 in")


def test_fine_tune_evaluation_shows_progress(caplog, monkeypatch):
    import timm
    from fcmae.distributed import DistInfo
    from fcmae.finetune import evaluate_classifier
    monkeypatch.setattr(loggers, "PHASE_LOG_EVERY_S", 0.0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    model = timm.create_model("convnextv2_atto", num_classes=3)
    loader = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 2]), torch.tensor([True, True])) for _ in range(2)]
    with caplog.at_level("INFO", logger="fcmae"):
        evaluate_classifier(model, loader, torch.device("cpu"), DistInfo())
    assert any(r.getMessage().startswith("evaluating val: 1/2 batches") for r in caplog.records)


@pytest.mark.slow
def test_config_errors_leave_no_directory_and_eval_only_no_training_directory(tmp_path):
    proc = _app(["model.mask_ratio=1.0", "data.img_size=100"], tmp_path)
    assert proc.returncode == 1 and "model.mask_ratio=1.0" in proc.stderr and "data.img_size=100" in proc.stderr
    assert not (tmp_path / "outputs").exists()  # before: a directory with .hydra/ and runner.log only

    run(make_cfg("trainer.max_steps=1"), tmp_path / "outputs" / "pretrained")
    hydra_record = tmp_path / "outputs" / "pretrained" / ".hydra"
    proc = _app(["eval_only=true", f"model.init_from={tmp_path / 'outputs' / 'pretrained'}", "data.num_workers=0"],
                tmp_path, app="fcmae.finetune")
    assert proc.returncode == 1 and "holds no classifier head" in proc.stdout + proc.stderr
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["pretrained"]  # no finetune-... directory
    assert not hydra_record.exists()


def test_a_bad_shard_member_is_named_with_the_file_it_was_packed_from(tmp_path, caplog):
    from fcmae.data.shards import ShardImages
    from fcmae.data.shards_pack import pack
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (i * 50, 0, 0)).save(src / f"img{i}.png")
    (src / "img1.png").write_bytes(b"not an image")
    lines = []
    pack(src, tmp_path / "shards", log=lines.append)
    shards = ShardImages(tmp_path / "shards")
    described = [shards.describe(i) for i in range(len(shards))]
    assert any(d.endswith(f"(packed from {src / 'img1.png'})") for d in described)


def test_messages_say_what_the_run_does(tmp_path, caplog):
    small = ["trainer.epochs=1", "data.synthetic_images=8"]  # 2 steps per epoch: the schedule ends at step 2
    run(make_cfg(*small, "trainer.max_steps=1"), tmp_path)
    with caplog.at_level("INFO", logger="fcmae"):
        run(make_cfg(*small, "trainer.max_steps=1"), tmp_path)
    assert "its trainer.max_steps; to train further, raise trainer.max_steps (up to 2, the end of its schedule, it " \
           "continues on the same cosine" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="fcmae"):
        run(make_cfg(*small, "trainer.max_steps=2"), tmp_path)
        run(make_cfg(*small, "trainer.max_steps=2"), tmp_path)
    assert "continuing at step 1" in caplog.text and "the end of its schedule" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="fcmae"):
        run(make_cfg(*small, "trainer.max_steps=3"), tmp_path)
    assert "a warm restart, the lr rises again" in caplog.text  # the words quickstart.md promises


@pytest.mark.slow
def test_help_and_job_names_are_the_apps_names(tmp_path):
    from hydra import compose, initialize_config_dir
    from fcmae.config import CONFIG_PATH
    proc = _app(["--help"], tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("fcmae-pretrain is powered by Hydra"), proc.stdout[:200]
    for app in ("pretrain", "finetune"):  # the name Hydra gives --help, the log file and Slurm jobs
        with initialize_config_dir(config_dir=CONFIG_PATH, version_base=None):
            assert compose(app, return_hydra_config=True).hydra.job.name == f"fcmae-{app}"


def test_a_submitit_warning_is_printed_once(tmp_path):
    code = ("import logging, sys\n"
            "logging.basicConfig(stream=sys.stderr)  # the root console handler, as Hydra's\n"
            "from fcmae.run.entry import print_submitit_warnings_once\n"
            "from submitit.core import logger\n"
            "print_submitit_warnings_once()\n"
            "logger.get_logger().warning('Call #1 - Bypassing sacct error')\n"
            "logger.get_logger().info('submitted')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    both = proc.stdout + proc.stderr
    assert both.count("Bypassing sacct error") == 1 and both.count("submitted") == 1  # before: the warning 3 times

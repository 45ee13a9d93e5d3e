"""Nothing silently wrong, round two (#40): divergence as a state of the run, rollbacks the run keeps,
the keys a resume checks, and a run's identity. Each test is one of the issue's cases and fails on the
code before it."""
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fcmae.config import ConfigError
from fcmae.engine import LossDiverged, NonFiniteLoss
from fcmae.engine.state import RECOVERY_STEPS, LoopState
from fcmae.export.exporter import export
from fcmae.pretrain import run
from fcmae.storage.checkpoint import load_checkpoint

from test_pretrain import make_cfg, metrics

EVERY = ["trainer.ckpt_every=2", "trainer.keep_checkpoints=20"]


def _numbered(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*.pt"))


def _blow_up_at(step: int, restore_at: int | None = None, scale: float = 1e4):
    """A callback: after ``step`` the decoder's output layer is scaled by ``scale`` (the next loss is
    finite and huge); after ``restore_at`` it is put back (the run can recover)."""
    saved = {}

    def callback(loop):
        pred = loop.raw_model.pred
        if loop.state.step == step:
            saved["w"], saved["b"] = pred.weight.detach().clone(), pred.bias.detach().clone()
            with torch.no_grad():
                pred.weight.mul_(scale)
                pred.bias.mul_(scale)
        if restore_at is not None and loop.state.step == restore_at:
            with torch.no_grad():
                pred.weight.copy_(saved["w"])
                pred.bias.copy_(saved["b"])
    return callback


# ---------------------------------------------------------------- 1. a finite divergence stops the run

def test_a_loss_that_diverges_but_stays_finite_warns_then_stops_past_the_bound(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fcmae"), pytest.raises(LossDiverged) as info:
        run(make_cfg(*EVERY, "trainer.max_steps=12"), tmp_path, callbacks=[_blow_up_at(5)])
    msg = str(info.value)
    assert "at step 6" in msg and "trainer.divergence_stop=1000" in msg
    assert "step 6: loss" in caplog.text and "left its range" in caplog.text  # the warning came first
    # the checkpoint of step 5 fed step 6: set aside; step 4 is the last good one, and the advice
    # resumes this run directory (a lowered optim.blr alone would name another one)
    assert "checkpoint-0000004.pt (step 4)" in msg and f"hydra.run.dir={tmp_path}" in msg
    assert _numbered(tmp_path) == ["checkpoint-0000002.pt", "checkpoint-0000004.pt"]
    assert isinstance(info.value, NonFiniteLoss)  # reported (exit code, one line) as a blow-up is


def test_the_divergence_bound_can_be_turned_off_and_is_checked(tmp_path):
    final = run(make_cfg(*EVERY, "trainer.max_steps=8", "trainer.divergence_stop=null"), tmp_path,
                callbacks=[_blow_up_at(5)])
    assert final.step == 8 and final.blowup_step == 6  # finished, but the spike is on record
    ck = load_checkpoint(tmp_path / "checkpoints/last.pt")
    assert ck["blowup_step"] == 6
    with pytest.raises(ConfigError, match="trainer.divergence_stop=5.0 must be above 10"):
        run(make_cfg("trainer.divergence_stop=5"), tmp_path / "other")


# ---------------------------------------------------------------- 5. a spike recovered from is forgiven

@pytest.mark.slow
def test_a_recovered_spike_does_not_condemn_the_checkpoints_after_it(tmp_path, caplog):
    """The loss leaves its range at step 4 and is back from step 5; a NaN long after condemns only
    the checkpoints that fed it, and the run, its checkpoint and the export say it spiked."""
    recovered_by = 4 + RECOVERY_STEPS

    def nan_after(loop):
        if loop.state.step == recovered_by + 5:
            with torch.no_grad():
                loop.raw_model.pred.bias.fill_(float("nan"))

    steps = f"trainer.max_steps={recovered_by + 8}"
    with caplog.at_level(logging.WARNING, logger="fcmae"), pytest.raises(NonFiniteLoss) as info:
        run(make_cfg(*EVERY, steps, "trainer.divergence_stop=null"), tmp_path,
            callbacks=[_blow_up_at(3, restore_at=4), nan_after])
    assert f"step {recovered_by}: the loss is back in its range after the spike from step 4" in caplog.text
    bad = recovered_by + 6
    assert f"at step {bad}" in str(info.value)
    kept = _numbered(tmp_path)  # every checkpoint before the NaN's step stays (only those >= bad - 1 go)
    assert kept == [f"checkpoint-{s:07d}.pt" for s in range(2, bad - 1, 2)]
    last = load_checkpoint(tmp_path / "checkpoints" / kept[-1])
    assert last["blowup_step"] is None and [s[:2] for s in last["spikes"]] == [[4, recovered_by]]
    lines = []
    export(tmp_path, "timm", out=tmp_path / "enc.safetensors", log=lines.append)
    assert any("loss left its range at step 4" in line and "recovered by step" in line for line in lines)


@pytest.mark.slow
def test_a_run_that_spiked_and_recovered_says_so_in_its_final_line(tmp_path, caplog):
    steps = f"trainer.max_steps={4 + RECOVERY_STEPS + 2}"
    with caplog.at_level(logging.INFO, logger="fcmae"):
        final = run(make_cfg(*EVERY, steps, "trainer.divergence_stop=null"), tmp_path,
                    callbacks=[_blow_up_at(3, restore_at=4)])
    assert final.spikes and final.blowup_step is None
    done = [r for r in caplog.records if r.getMessage().startswith("done:")]
    assert done and done[-1].levelno == logging.WARNING and "recovered by step" in done[-1].getMessage()


def test_the_spike_rule_by_hand():
    st = LoopState()
    events = [st.watch_loss(i, loss) for i, loss in enumerate([1.0, 0.8, 50.0, 30.0] + [0.7] * RECOVERY_STEPS, 1)]
    assert events[2] == "left" and events[-1] == "recovered" and events.count(None) == len(events) - 2
    assert st.spikes == [[3, 4 + RECOVERY_STEPS, 50.0]] and st.blowup_step is None
    again = LoopState.from_dict({k: v for k, v in st.to_dict().items() if k != "spikes"})
    assert again.spikes == []  # a checkpoint from before the field: no spikes on record


# ---------------------------------------------------------------- 2. a rollback the run keeps

def test_a_rollback_sets_the_newer_checkpoints_aside_and_every_reader_follows_it(tmp_path, caplog):
    ckdir = tmp_path / "checkpoints"
    run(make_cfg("trainer.ckpt_every=3", "trainer.max_steps=6"), tmp_path)
    assert _numbered(tmp_path) == ["checkpoint-0000003.pt", "checkpoint-0000006.pt"]
    back = f"resume={ckdir / 'checkpoint-0000003.pt'}"
    with caplog.at_level(logging.WARNING, logger="fcmae"):
        assert run(make_cfg("trainer.ckpt_every=3", "trainer.max_steps=4", back), tmp_path).step == 4
    assert "rolls the run back to step 3" in caplog.text and "checkpoint-0000006.pt" in caplog.text
    # the abandoned future is kept under another name; the rotation kept the one resumed from
    assert _numbered(tmp_path) == ["checkpoint-0000003.pt", "checkpoint-0000004.pt"]
    assert (ckdir / "checkpoint-0000006.pt.abandoned").is_file()
    assert os.readlink(ckdir / "last.pt") == "checkpoint-0000004.pt"
    assert [m["step"] for m in metrics(tmp_path) if "loss" in m] == [1, 2, 3, 4]  # one timeline
    lines = []
    export(tmp_path, "timm", out=tmp_path / "enc.safetensors", log=lines.append, verify=False)
    assert any(line.startswith("read ") and "checkpoint-0000004.pt" in line for line in lines), lines
    # The same resume=PATH command again (a requeue): it continues the new timeline, not step 3 again.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fcmae"):
        assert run(make_cfg("trainer.ckpt_every=3", "trainer.max_steps=5", back), tmp_path).step == 5
    assert "has trained on from its step 3 to step 4 since" in caplog.text
    assert [m["step"] for m in metrics(tmp_path) if "loss" in m] == [1, 2, 3, 4, 5]
    # and a plain rerun (resume=auto) follows it too
    assert run(make_cfg("trainer.ckpt_every=3", "trainer.max_steps=6"), tmp_path).step == 6
    assert [m["step"] for m in metrics(tmp_path) if "loss" in m] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------- 6. the tidy touches only its own files

def test_starting_a_run_leaves_an_export_s_temporary_file_alone(tmp_path):
    run(make_cfg("trainer.max_steps=2"), tmp_path)
    ckdir = tmp_path / "checkpoints"
    exporting = ckdir / ".checkpoint-0000002_timm.safetensors.tmp"  # fcmae-export writing beside it
    exporting.write_bytes(b"partial")
    ours = ckdir / ".checkpoint-0000009.pt.tmp"
    ours.write_bytes(b"partial")
    run(make_cfg("trainer.max_steps=2"), tmp_path)
    assert exporting.exists() and not ours.exists()


# ---------------------------------------------------------------- 3. what a resume may change

def test_a_resume_refuses_another_seed_or_accumulation_and_keeps_the_effective_batch(tmp_path, caplog):
    run(make_cfg("trainer.max_steps=2", "data.batch_size=8"), tmp_path)
    with pytest.raises(ConfigError, match=r"trainer.seed: 0 -> 1.*continue with the original value"):
        run(make_cfg("trainer.max_steps=4", "data.batch_size=8", "trainer.seed=1"), tmp_path)
    with pytest.raises(ConfigError, match=r"effective batch of 8; trainer.accum_iter: 1 -> 2 would make it 16"):
        run(make_cfg("trainer.max_steps=4", "data.batch_size=8", "trainer.accum_iter=2"), tmp_path)
    with caplog.at_level(logging.WARNING, logger="fcmae"):  # a smaller batch alone: the accumulation makes up the rest
        final = run(make_cfg("trainer.max_steps=3", "data.batch_size=4", "optim.lr=5e-4"), tmp_path)
    assert final.step == 3
    assert "data.batch_size: 8 -> 4: accumulation 2 keeps its effective batch 8" in caplog.text
    assert "optim.lr: 0.001 -> 0.0005: in effect from step 2 on" in caplog.text  # taken, and said
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["effective_batch"] == 8


# ---------------------------------------------------------------- 12. a run's identity is its data

def _folder(root: Path, n: int) -> Path:
    from PIL import Image
    root.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (64, 64), (i * 20 % 255, 40, 90)).save(root / f"{i}.png")
    return root


def test_another_dataset_does_not_continue_a_run(tmp_path, caplog):
    a, b = _folder(tmp_path / "a", 8), _folder(tmp_path / "b", 4)
    run_dir = tmp_path / "run"
    data = ["data.source=folder", "trainer.max_steps=2"]
    run(make_cfg(*data, f"data.root={a}"), run_dir)
    with pytest.raises(ConfigError, match=rf"trained on data.root={a} \(8 images\); {b} holds 4.*another dataset"):
        run(make_cfg(*data, f"data.root={b}", "trainer.max_steps=3"), run_dir)
    moved = tmp_path / "a_moved"
    a.rename(moved)
    with caplog.at_level(logging.WARNING, logger="fcmae"):  # the same images, moved: taken, and said
        assert run(make_cfg(*data, f"data.root={moved}", "trainer.max_steps=3"), run_dir).step == 3
    assert "holds the same number of images (8): taken as the same data, moved" in caplog.text


# ---------------------------------------------------------------- 13, 14. names and keys

def test_a_key_that_does_not_exist_is_refused_with_or_without_plus(tmp_path):
    with pytest.raises(ConfigError, match=r"model.mask_ratoi is not a key.*did you mean model.mask_ratio\?"):
        run(make_cfg("+model.mask_ratoi=0.3"), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_long_per_band_values_do_not_fill_a_run_directory_s_name(tmp_path):
    from fcmae.config.naming import run_subdir, safe_dirname
    means = ",".join(f"0.{i}" for i in range(12))
    overrides = f"data.mean=[{means}],data.std=[{means}],model.in_chans=12"
    name = safe_dirname(overrides)
    assert "model.in_chans:12" in name and name.startswith("data.mean:12values-") and len(name) < 80
    assert safe_dirname(overrides.replace("0.11", "0.12")) != name  # other values, another run
    assert safe_dirname("data.crop_scale=[0.35,1.0]") == "data.crop_scale:0.35+1.0"  # short lists as before
    older = tmp_path / safe_dirname(overrides, short_lists=False)  # a run started before: still resumes
    older.mkdir()
    assert run_subdir(str(tmp_path), overrides) == older.name


# ---------------------------------------------------------------- 7. a refused run touches nothing

@pytest.mark.slow
def test_a_run_refused_by_the_lock_leaves_the_running_run_s_hydra_record_alone(tmp_path):
    from fcmae.storage.run_lock import RunLock
    run_dir = tmp_path / "run"
    record = run_dir / ".hydra" / "overrides.yaml"
    record.parent.mkdir(parents=True)
    record.write_text("- trainer.max_steps=100\n")
    with RunLock(run_dir):  # the running run
        proc = subprocess.run([sys.executable, "-m", "fcmae.pretrain", "trainer.max_steps=1", "data.num_workers=0",
                               f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert proc.returncode == 1 and "is in use by another run" in proc.stderr, proc.stderr[-2000:]
    assert record.read_text() == "- trainer.max_steps=100\n"


# ---------------------------------------------------------------- 4. non-finite pixels are bad images

def _folder_with_nan_image(root: Path) -> Path:
    import numpy as np
    _folder(root, 7)
    bad = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    bad[5, 5, 1] = np.nan
    np.save(root / "nan.npy", bad)
    (root / "gone.png").symlink_to(root / "missing.png")  # a dangling link
    return root


def test_fcmae_stats_names_and_counts_what_it_skipped_and_never_prints_nan(tmp_path, capsys, caplog):
    import json
    from fcmae.data.stats import main
    root = _folder_with_nan_image(tmp_path / "imgs")
    with caplog.at_level(logging.WARNING, logger="fcmae"):
        assert main([str(root), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)  # strict JSON: a NaN would not parse back as a number
    assert all(isinstance(v, float) and v == v for v in stats["mean"] + stats["std"])
    assert "skipped 2 of the 9 images drawn" in caplog.text


def test_an_image_with_nan_pixels_is_a_bad_image_not_a_blow_up(tmp_path, caplog):
    root = _folder_with_nan_image(tmp_path / "imgs")
    with caplog.at_level(logging.WARNING, logger="fcmae"):
        final = run(make_cfg("data.source=folder", f"data.root={root}", "trainer.max_steps=4",
                             "data.max_bad_fraction=0.9"), tmp_path / "run")
    assert final.step == 4 and final.bad_images >= 1 and final.blowup_step is None
    assert "nan.npy" in caplog.text and "NaN or Inf" in caplog.text


# ---------------------------------------------------------------- small items

def test_a_forgotten_npy_layout_is_named_not_answered_with_64_bands(tmp_path):
    import numpy as np
    from fcmae.data.image_io import BandCountError, Channels
    np.save(tmp_path / "a.npy", np.zeros((3, 64, 64), np.float32))  # (C, H, W) read as (H, W, C)
    with pytest.raises(BandCountError) as info:
        Channels("all", None, 3, "hwc").read(tmp_path / "a.npy")
    assert "data.npy_layout=chw" in info.value.fix
    assert Channels("all", None, 3, "chw").read(tmp_path / "a.npy").shape == (3, 64, 64)

"""Correct under real conditions: group signals with loader workers, DDP data accounting, longer
runs, per-rank RNGs, the logged lr, images read faithfully, and an export check that can fail."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcmae.storage.checkpoint import capture_rng, load_checkpoint, restore_rng
from fcmae.data.image_io import DataError, open_image
from fcmae.data.sources import labelled_source, scan_image_folder
from fcmae.optim import cosine_lr
from fcmae.pretrain import run

from test_pretrain import TINY, _image_folder, make_cfg, metrics, params

# ---------------------------------------------------------------- signals to the whole process group

SIGNAL_RUN = [o for o in TINY if not o.startswith("data.num_workers")] + [
    "data.num_workers=2", "trainer.max_steps=12", "data.synthetic_images=64", "trainer.ckpt_every=1000",
    "hydra.run.dir=run"]


def _start(cwd: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fcmae.pretrain", *SIGNAL_RUN, *extra], cwd=cwd, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # a background job of a non-interactive shell starts with SIGINT ignored; a terminal's does not
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    path = run_dir / "metrics.jsonl"
    while time.time() < end:
        if path.is_file() and sum(1 for _ in path.open()) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before step {step}: {proc.stdout.read()[-2000:]}")
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout} s")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("straight")
    proc = _start(cwd)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return cwd / "run"


@pytest.mark.slow
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_group_signal_with_loader_workers_checkpoints_and_resumes_exactly(signame, straight_run, tmp_path):
    sig = getattr(signal, signame)
    proc = _start(tmp_path)
    _wait_for_step(tmp_path / "run", 2, proc)
    os.killpg(proc.pid, sig)  # as Slurm, `timeout` and a terminal do: every process, workers included
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, out[-3000:]
    assert "Traceback" not in out and "killed by signal" not in out, out[-3000:]
    assert f"caught {signame}: checkpoint of step" in out
    step = load_checkpoint(tmp_path / "run/checkpoints/last.pt")["step"]
    assert 2 <= step < 12

    proc = _start(tmp_path)  # the same command resumes
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from" in out
    a, b = params(straight_run), params(tmp_path / "run")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_signal_in_the_last_step_leaves_the_final_evaluation_to_the_rerun(tmp_path):
    from fcmae.engine import Preempted

    def at_the_end(loop):
        if loop.state.step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)

    evals = ["eval=knn", "eval.synthetic_train_images=16", "eval.synthetic_val_images=8", "eval.num_workers=0",
             "eval.k=3", "eval.batch_size=8"]
    with pytest.raises(Preempted):
        run(make_cfg("trainer.max_steps=3", *evals), tmp_path, callbacks=[at_the_end])
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["finished"] is False
    assert not any("eval/knn_top1" in m for m in metrics(tmp_path))
    run(make_cfg("trainer.max_steps=3", *evals), tmp_path)  # the re-run only finishes the run
    ck = load_checkpoint(tmp_path / "checkpoints/last.pt")
    assert ck["finished"] is True and ck["step"] == 3
    assert any("eval/knn_top1" in m for m in metrics(tmp_path))


def test_a_signal_during_setup_is_not_lost(tmp_path):
    """The apps guard from their start: a Slurm warning that arrives before the loop (data and
    model still being built) stops the run after its first step, checkpointed, and is then
    handed to the launcher's own handler."""
    from fcmae.engine import Preempted, PreemptionGuard
    launcher_calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: launcher_calls.append(signum))
    try:
        with pytest.raises(Preempted) as info:
            with PreemptionGuard():
                os.kill(os.getpid(), signal.SIGUSR2)  # "during setup"
                run(make_cfg("trainer.max_steps=5"), tmp_path)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert info.value.step == 1 and info.value.signum == signal.SIGUSR2
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["step"] == 1
    assert launcher_calls == [signal.SIGUSR2]  # e.g. submitit's requeue, after the checkpoint


# ---------------------------------------------------------------- DDP accounting

def _ddp_worker(rank, world, port, run_dir, overrides, results, signal_rank_1_after=None):
    """One rank of a 2-process gloo run; puts ``(rank, outcome)``. ``signal_rank_1_after``: the step
    after which rank 1 alone sends itself SIGUSR1."""
    from fcmae.engine import Preempted
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)

    def signal_rank_1(loop):
        if rank == 1 and loop.state.step == signal_rank_1_after:
            os.kill(os.getpid(), signal.SIGUSR1)
    try:
        run(make_cfg(*overrides), run_dir, callbacks=[signal_rank_1])
        results.put((rank, "finished"))
    except Preempted as exc:
        results.put((rank, f"Preempted at step {exc.step}"))
    except Exception as exc:
        results.put((rank, f"{type(exc).__name__}: {exc}"))


def _run_two_ranks(run_dir, overrides, **kw) -> dict:
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, run_dir, overrides, results), kwargs=kw)
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    return dict(results.get(timeout=5) for _ in procs)


@pytest.mark.slow
def test_ddp_bad_images_are_counted_globally_and_every_rank_stops_with_one_rank(tmp_path):
    _image_folder(tmp_path / "imgs", good=28, bad=4)
    common = ["data=imagefolder", f"data.root={tmp_path / 'imgs'}", "data.max_bad_fraction=0.03", "trainer.max_steps=4",
              "trainer.device=cpu", "data.num_workers=0"]
    with pytest.raises(Exception) as single:
        run(make_cfg(*common, "data.batch_size=8"), tmp_path / "single")
    assert type(single.value).__name__ == "DataQualityError"

    got = _run_two_ranks(tmp_path / "ddp", [*common, "data.batch_size=4"])
    # the same global batches, so the same step and the same global count on both ranks
    expected = f"DataQualityError: {single.value}"
    assert got == {0: expected, 1: expected}


@pytest.mark.slow
def test_ddp_ranks_agree_on_a_signal_read_a_step_late(tmp_path):
    """Between log steps the ranks' flags are read a step late (no host wait per step): a signal
    one rank catches after step 1 is in step 2's all-reduce, read once step 3 is queued, so every
    rank stops after step 3, with one checkpoint of it."""
    overrides = ["trainer.device=cpu", "data.batch_size=2", "trainer.max_steps=8", "trainer.log_every=10",
                 "trainer.ckpt_every=100"]
    got = _run_two_ranks(tmp_path / "ddp", overrides, signal_rank_1_after=1)
    assert got == {0: "Preempted at step 3", 1: "Preempted at step 3"}
    ckpts = sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").glob("checkpoint-*.pt"))
    assert ckpts == ["checkpoint-0000003.pt"]
    state = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "checkpoint-0000003.pt")
    assert (state["step"], state["world_size"]) == (3, 2)


# ---------------------------------------------------------------- longer runs, RNG streams, the logged lr

def test_larger_max_steps_makes_a_finished_run_longer(tmp_path, caplog):
    run(make_cfg("trainer.epochs=1"), tmp_path)  # 8 steps: the whole schedule
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["step"] == 8
    with caplog.at_level("INFO", logger="fcmae"):
        state = run(make_cfg("trainer.epochs=1", "trainer.max_steps=12"), tmp_path)
    assert state.step == 12
    assert "stretched to end at step 12" in caplog.text
    m = {r["step"]: r for r in metrics(tmp_path) if "lr" in r}
    assert m[9]["lr"] == pytest.approx(cosine_lr(8, 1e-3, 0.0, 0, 12)) and m[9]["lr"] > 0


def test_numpy_and_python_streams_differ_per_rank_and_restore_exactly():
    from fcmae.run.seeding import seed_rank
    draws = []
    for rank in (0, 1):
        seed_rank(0, rank)
        draws.append((np.random.rand(), random.random(), torch.rand(1).item()))
    assert all(a != b for a, b in zip(*draws))
    seed_rank(0, 1)
    state = capture_rng()
    first = (np.random.rand(3).tolist(), random.random(), torch.rand(2).tolist())
    restore_rng(state)
    assert (np.random.rand(3).tolist(), random.random(), torch.rand(2).tolist()) == first


def test_logged_lr_is_the_schedule_with_the_layer_decay_range(tmp_path):
    from fcmae.finetune import run as finetune_run
    from hydra import compose, initialize_config_dir
    from fcmae.config import CONFIG_PATH
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base=None):
        cfg = compose("finetune", overrides=[
            "data.img_size=64", "data.batch_size=8", "data.num_workers=0", "data.synthetic_images=32",
            "data.synthetic_val_images=16", "trainer.max_steps=3", "trainer.log_every=1", "optim.lr=1e-3",
            "schedule.warmup_steps=2", "trainer.progress=log", "optim.layer_decay=0.5"])
    finetune_run(cfg, tmp_path)
    rows = [r for r in metrics(tmp_path) if "lr" in r]
    total = 5 * 4  # epochs x steps per epoch
    for r in rows:
        assert r["lr"] == pytest.approx(cosine_lr(r["step"] - 1, 1e-3, 1e-6, 2, total))
        if r["lr"] > 0:  # step 1 of the warmup is at 0
            assert r["lr_min"] < r["lr_max"] <= r["lr"] + 1e-12


# ---------------------------------------------------------------- images read faithfully

def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    Image.fromarray(ramp).save(tmp_path / "g16.tif")
    Image.fromarray((ramp / 65535).astype(np.float32)).save(tmp_path / "f32.tif")
    for name in ("g16.png", "g16.tif", "f32.tif"):
        got = np.asarray(open_image(tmp_path / name))
        assert got.shape == (64, 64, 3)
        assert (got == 255).mean() < 0.01, name  # Pillow's convert("RGB") leaves 99.6% at 255
        expected = np.round(ramp / 257.0)
        assert np.abs(got[..., 0].astype(float) - expected).max() <= 1, name


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (64, 32), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 32, 32))  # white left half as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display", as phones write it
    img.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    shown = np.asarray(open_image(tmp_path / "phone.jpg")).mean(axis=2)
    assert shown.shape == (64, 32)  # upright: portrait
    assert shown[:32].mean() > 200 and shown[32:].mean() < 50  # stored left half is the displayed top


def test_val_classes_are_matched_by_name(tmp_path):
    for split, classes in (("train", ("cat", "dog", "fox")), ("val", ("dog", "fox"))):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / c / "a.png")
    train = scan_image_folder(tmp_path / "train")
    val = labelled_source("imagefolder", str(tmp_path / "val"), "val", 0, 0, 32, 0, class_names=train.classes)
    assert [(p.parent.name, y) for p, y in zip(val.paths, val.labels)] == [("dog", 1), ("fox", 2)]
    (tmp_path / "val" / "owl").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "owl" / "a.png")
    with pytest.raises(DataError, match=r"'owl'"):
        scan_image_folder(tmp_path / "val", train.classes)


# ---------------------------------------------------------------- an export check that can fail

def test_export_verification_catches_a_reading_error(tmp_path, monkeypatch, capsys):
    import fcmae.export.exporter as export_mod
    from fcmae import create_fcmae
    torch.save({"model": create_fcmae("convnextv2_atto").state_dict()}, tmp_path / "ck.pt")
    assert export_mod.main([str(tmp_path / "ck.pt"), "--out", str(tmp_path / "ok.safetensors")]) == 0
    assert "read without the converter" in capsys.readouterr().out

    real = export_mod.to_canonical

    def misread(obj, source="checkpoint"):  # a converter bug: every 7x7 depthwise kernel transposed
        canonical, layout = real(obj, source)
        return {k: v.transpose(-1, -2) if k.endswith("dwconv.weight") else v for k, v in canonical.items()}, layout
    monkeypatch.setattr(export_mod, "to_canonical", misread)
    assert export_mod.main([str(tmp_path / "ck.pt"), "--out", str(tmp_path / "bad.safetensors")]) == 2
    assert "verification FAILED" in capsys.readouterr().err

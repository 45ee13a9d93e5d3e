"""The pretraining app: configs, run directory, resume, preemption, data problems, DDP."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from fcmae.storage.checkpoint import load_checkpoint
from fcmae.config import ConfigError
from fcmae.data.samples import PretrainSamples
from fcmae.data.loaders import ResumableSampler
from fcmae.data.sources import SyntheticImages
from fcmae.data.transforms import pretrain_transform
from fcmae.engine import NonFiniteLoss, Preempted
from fcmae.pretrain import CONFIG_PATH, run

# A small, fast setup: atto at 64 px (2x2 patches), tiny decoder, no workers.
TINY = [
    "data.img_size=64", "data.batch_size=4", "data.num_workers=0", "data.synthetic_images=32",
    "model.decoder_embed_dim=32", "schedule.warmup_steps=0", "optim.lr=1e-3", "trainer.epochs=2",
    "trainer.log_every=1", "trainer.progress=log", "model.mask_ratio=0.5",
]


def make_cfg(*overrides):
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base=None):
        return compose("pretrain", overrides=[*TINY, *overrides])


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def params(run_dir):
    return load_checkpoint(Path(run_dir) / "checkpoints" / "last.pt")["model"]


def assert_resume_is_bit_identical(tmp_path, overrides, stop_after: int = 2):
    """A run stopped by SIGUSR1 after step ``stop_after + 1`` and resumed ends with the weights and
    loss curve of the same run straight through."""
    run(make_cfg(*overrides), tmp_path / "straight")

    def preempt(loop):  # a signal after this step's work is acted on at the next step boundary
        if loop.state.step == stop_after:
            os.kill(os.getpid(), signal.SIGUSR1)

    with pytest.raises(Preempted):
        run(make_cfg(*overrides), tmp_path / "interrupted", callbacks=[preempt])
    run(make_cfg(*overrides), tmp_path / "interrupted")
    a, b = params(tmp_path / "straight"), params(tmp_path / "interrupted")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [m["loss"] for m in metrics(tmp_path / "straight")] == [m["loss"] for m in metrics(tmp_path / "interrupted")]


def test_run_writes_outputs_and_continues_with_larger_max_steps(tmp_path):
    state = run(make_cfg("trainer.max_steps=3", "trainer.vis_every=2"), tmp_path)
    assert state.step == 3
    for rel in ("checkpoints/last.pt", "checkpoints/checkpoint-0000003.pt", "metrics.jsonl", "config.yaml",
                "reconstructions/step-0000002.png", "reconstructions/step-0000003.png"):
        assert (tmp_path / rel).is_file(), rel
    with Image.open(tmp_path / "reconstructions/step-0000003.png") as im:
        assert im.size[1] > 3 * 64  # three rows: original, masked, reconstruction
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3]

    state = run(make_cfg("trainer.max_steps=5"), tmp_path)  # the same command, further
    assert state.step == 5
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3, 4, 5]
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["step"] == 5
    # keep the newest two numbered checkpoints
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("checkpoint-*.pt")) == \
        ["checkpoint-0000003.pt", "checkpoint-0000005.pt"]


def test_interrupted_then_resumed_is_bit_identical(tmp_path):
    common = ["model.drop_path_rate=0.2", "trainer.accum_iter=2", "trainer.max_steps=7", "trainer.ckpt_every=100"]
    # 32 images / batch 4 = 8 micro-batches = 4 steps per epoch: step 3 is mid-epoch
    run(make_cfg(*common), tmp_path / "straight")

    def preempt_at_3(loop):  # a signal after step 2's work is acted on at the next step boundary
        if loop.state.step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)

    with pytest.raises(Preempted) as info:
        run(make_cfg(*common), tmp_path / "interrupted", callbacks=[preempt_at_3])
    assert info.value.step == 3
    ck = load_checkpoint(tmp_path / "interrupted/checkpoints/last.pt")
    assert (ck["step"], ck["epoch"], ck["batch_in_epoch"]) == (3, 0, 6)
    run(make_cfg(*common), tmp_path / "interrupted")

    a, b = params(tmp_path / "straight"), params(tmp_path / "interrupted")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [m["loss"] for m in metrics(tmp_path / "straight")]
    lb = [m["loss"] for m in metrics(tmp_path / "interrupted")]
    assert la == lb


def test_sampler_resumes_mid_epoch_without_repeats_or_gaps():
    ds = PretrainSamples(SyntheticImages(40, size=32), pretrain_transform(32), 32, 0.5)
    for rank in (0, 1):
        s = ResumableSampler(ds, num_replicas=2, rank=rank, seed=3)
        s.set_epoch(2)
        full = list(s)
        s.set_start(7)
        assert list(s) == full[7:]
        assert all(k // 40 == 2 for k in full)  # keys carry the epoch
    s0, s1 = ResumableSampler(ds, 2, 0, 3), ResumableSampler(ds, 2, 1, 3)
    assert sorted(k % 40 for k in [*s0, *s1]) == list(range(40))
    s0.set_epoch(1)
    assert list(s0) != [k + 40 for k in ResumableSampler(ds, 2, 0, 3)]  # reshuffled each epoch


def test_samples_are_deterministic_in_epoch_and_index():
    ds = PretrainSamples(SyntheticImages(8, size=80), pretrain_transform(64), 64, 0.75)
    x1, m1, bad, key = ds[8 + 3]
    x2, m2, _, _ = ds[8 + 3]
    assert torch.equal(x1, x2) and torch.equal(m1, m2) and bad == 0 and key == 11
    assert int((m1 == 0).sum()) == 1  # int(4 * 0.25)
    x3, _, _, _ = ds[16 + 3]  # same image, next epoch: a new crop
    assert not torch.equal(x1, x3)


def _image_folder(root: Path, good: int, bad: int):
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
    for i in range(good):
        Image.new("RGB", (80, 72), color=(i * 7 % 255, 100, 50)).save(root / ("cat" if i % 2 else "dog") / f"{i}.png")
    for i in range(bad):
        (root / "cat" / f"broken{i}.jpg").write_bytes(b"not a jpeg")


def test_corrupt_images_are_skipped_named_and_counted(tmp_path, caplog):
    _image_folder(tmp_path / "imgs", good=15, bad=1)
    cfg = make_cfg("data=imagefolder", f"data.root={tmp_path / 'imgs'}", "trainer.max_steps=4",
                   "data.max_bad_fraction=0.5")
    with caplog.at_level("WARNING"):
        run(cfg, tmp_path / "run")
    assert "broken0.jpg" in caplog.text
    assert metrics(tmp_path / "run")[-1]["bad_images"] >= 1

    from fcmae.engine import DataQualityError
    cfg = make_cfg("data=imagefolder", f"data.root={tmp_path / 'imgs'}", "trainer.max_steps=4",
                   "data.max_bad_fraction=0.001")
    with pytest.raises(DataQualityError, match="max_bad_fraction"):
        run(cfg, tmp_path / "run2")


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path):
    # The weights of a checkpoint of step k feed step k + 1: poisoned after step 3, step 4 is the
    # first bad loss, and the checkpoint of step 2 (whose weights fed the sane step 3) is good.
    def poison_after_3(loop):
        if loop.state.step == 3:
            with torch.no_grad():
                loop.raw_model.pred.bias.fill_(float("nan"))

    with pytest.raises(NonFiniteLoss, match=r"step 4.*last good checkpoint is .*checkpoint-0000002"):
        run(make_cfg("trainer.max_steps=6", "trainer.ckpt_every=2"), tmp_path, callbacks=[poison_after_3])
    ck = load_checkpoint(tmp_path / "checkpoints/last.pt")
    assert ck["step"] == 2
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_range_errors_before_data_is_read(tmp_path):
    with pytest.raises(ConfigError) as info:
        run(make_cfg("data=imagefolder", "data.root=/nonexistent", "data.img_size=100", "model.mask_ratio=1.0",
                     "data.batch_size=0"), tmp_path)
    msg = str(info.value)
    assert "data.img_size=100" in msg and "model.mask_ratio=1.0" in msg and "data.batch_size=0" in msg


def test_resume_refuses_a_different_model(tmp_path):
    run(make_cfg("trainer.max_steps=1"), tmp_path)
    with pytest.raises(ConfigError, match="trained with another model.decoder_embed_dim: 32 -> 16"):
        run(make_cfg("trainer.max_steps=2", "model.decoder_embed_dim=16"), tmp_path)


def test_effective_batch_sets_accumulation_or_explains(tmp_path):
    run(make_cfg("optim.effective_batch_size=8", "trainer.max_steps=1", "optim.lr=null", "optim.blr=1e-3"), tmp_path)
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["batch_in_epoch"] == 2  # accum 2
    with pytest.raises(ConfigError, match="not a multiple"):
        run(make_cfg("optim.effective_batch_size=10", "trainer.max_steps=1"), tmp_path / "b")


def test_init_from_official_dense_checkpoint(tmp_path):
    from fcmae import create_fcmae
    src = create_fcmae("convnextv2_atto")
    enc = {k.removeprefix("encoder."): v for k, v in src.state_dict().items() if k.startswith("encoder.")}
    torch.save({"model": enc}, tmp_path / "official_fcmae.pt")
    run(make_cfg("trainer.max_steps=1", "optim.lr=1e-12", f"init_from={tmp_path / 'official_fcmae.pt'}"),
        tmp_path / "run")
    got = params(tmp_path / "run")
    assert torch.allclose(got["encoder.stages.2.1.pwconv1.weight"], enc["stages.2.1.pwconv1.weight"], atol=1e-9)


def test_cli_misspelled_key_fails_with_hydra_message(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fcmae.pretrain", "model.mask_ratoi=0.3"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "mask_ratoi" in proc.stderr
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.pt"))


def _ddp_worker(rank, world, port, run_dir, overrides, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    def dump_params(loop):
        if loop.state.step == 2:
            torch.save(loop.raw_model.state_dict(), run_dir.parent / f"params-rank{rank}.pt")

    try:
        torch.set_num_threads(1)
        run(make_cfg(*overrides), run_dir, callbacks=[dump_params])
    except Exception as exc:  # report to the parent
        errors.put(f"rank {rank}: {exc!r}")


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["trainer.max_steps=2", "trainer.device=cpu", "data.synthetic_images=32"]
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, tmp_path / "ddp", [*common, "data.batch_size=2"], errors))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert errors.empty(), errors.get()
    assert all(p.exitcode == 0 for p in procs)
    r0, r1 = torch.load(tmp_path / "params-rank0.pt"), torch.load(tmp_path / "params-rank1.pt")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # DDP keeps the ranks identical

    run(make_cfg(*common, "data.batch_size=4"), tmp_path / "single")
    ddp_m, single_m = metrics(tmp_path / "ddp"), metrics(tmp_path / "single")
    # step 1's loss is computed before any update: same samples and masks, same loss
    assert abs(ddp_m[0]["loss"] - single_m[0]["loss"]) < 1e-5
    a, b = params(tmp_path / "ddp"), params(tmp_path / "single")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k


def test_wandb_offline_logs_config_and_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(make_cfg("logger=wandb", "logger.mode=offline", "trainer.max_steps=2", "trainer.vis_every=2",
                 "logger.image_every=2"), tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = {p.name for p in runs[0].rglob("*")}
    assert any(name.endswith(".wandb") for name in files)
    assert (tmp_path / "wandb_id.txt").read_text().strip() in runs[0].name


@pytest.mark.slow
def test_multirun_sweep_one_directory_per_value(tmp_path):
    overrides = [o for o in TINY if not o.startswith("model.mask_ratio")]
    proc = subprocess.run(
        [sys.executable, "-m", "fcmae.pretrain", "-m", "model.mask_ratio=0.25,0.5", "trainer.max_steps=1",
         *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sweep = tmp_path / "outputs" / "multirun" / "convnextv2_atto-synthetic"
    for ratio in ("0.25", "0.5"):
        job = next(sweep.glob(f"*model.mask_ratio:{ratio}*"))  # passable back unquoted
        assert (job / "checkpoints" / "last.pt").is_file()
        assert f"mask_ratio: {ratio}" in (job / "config.yaml").read_text()


def test_batches_carry_their_checked_visible_count():
    from fcmae.data.image_io import DataError
    from fcmae.data.samples import collate_masked
    ds = PretrainSamples(SyntheticImages(8, size=80), pretrain_transform(64), 64, 0.5)
    batch = collate_masked([ds[i] for i in range(4)])
    assert batch[4] == 2 and torch.equal((batch[1] == 0).sum(1), torch.full((4,), 2))  # int(4 * 0.5)
    # a named batch (#39): the fields say what the positions meant
    assert batch.visible_per_sample == 2 and batch.masks is batch[1] and batch.images.shape == (4, 3, 64, 64)
    assert batch.keys.tolist() == [0, 1, 2, 3] and batch.bad.tolist() == [0, 0, 0, 0]
    odd = list(ds[0])
    odd[1] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # 3 visible where the others keep 2
    with pytest.raises(DataError, match=r"keep \[2, 3\] patches per sample"):
        collate_masked([ds[1], tuple(odd)])


def test_accum_iter_overridden_by_effective_batch_is_said(caplog):
    from fcmae.run.settings import resolve_accumulation
    with caplog.at_level("WARNING", logger="fcmae"):
        assert resolve_accumulation(make_cfg("optim.effective_batch_size=16", "trainer.accum_iter=3"), 1) == (4, 16)
    assert "trainer.accum_iter=3 is ignored" in caplog.text and "accumulation to 4" in caplog.text


def test_long_override_lists_get_a_short_stable_directory_name():
    from fcmae.config import MAX_DIRNAME, short_dirname
    assert short_dirname("model.mask_ratio=0.4") == "model.mask_ratio=0.4"
    long_a = ",".join(f"trainer.key{i}=value{i}" for i in range(30))  # ~600 characters
    long_b = long_a.replace("value29", "value30")
    a, b = short_dirname(long_a), short_dirname(long_b)
    assert len(a) <= MAX_DIRNAME and len(b) <= MAX_DIRNAME
    assert a == short_dirname(long_a)  # the same overrides find the same directory on resume
    assert a != b and a.startswith(long_a[:100])


@pytest.mark.slow
def test_trainer_compile_trains_like_eager(tmp_path):
    """trainer.compile=true (inductor) gives the eager run's losses and weights. A one-block-per-stage
    shape: the property does not depend on depth, and inductor's compile time does (~3x less)."""
    shape = ["model.name=custom_compile_check", "model.depths=[1,1,1,1]", "model.dims=[16,32,48,64]"]
    run(make_cfg("trainer.max_steps=3", *shape), tmp_path / "eager")
    run(make_cfg("trainer.max_steps=3", "trainer.compile=true", *shape), tmp_path / "compiled")
    le = [m["loss"] for m in metrics(tmp_path / "eager")]
    lc = [m["loss"] for m in metrics(tmp_path / "compiled")]
    assert lc == pytest.approx(le, rel=1e-4, abs=1e-5)
    pe, pc = params(tmp_path / "eager"), params(tmp_path / "compiled")
    assert pe.keys() == pc.keys()  # no "_orig_mod." prefix in the saved state dict
    for k in pe:
        assert torch.allclose(pc[k], pe[k], rtol=1e-3, atol=1e-5), k

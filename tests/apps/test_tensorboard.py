"""logger=tensorboard: the event file read back with TensorBoard's own reader matches metrics.jsonl
(training scalars, evaluation scores) and holds the reconstruction grid as an image."""
import json

import pytest

pytest.importorskip("tensorboard", reason="logger=tensorboard needs pip install 'fcmae[tensorboard]' (CI installs it)")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from fcmae.config import ConfigError  # noqa: E402
from fcmae.pretrain import run  # noqa: E402

from test_pretrain import make_cfg  # noqa: E402

EVAL = ["eval=knn", "eval.synthetic_train_images=16", "eval.synthetic_val_images=8", "eval.num_workers=0",
        "eval.k=3", "eval.batch_size=8"]


def read_events(run_dir):
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


@pytest.mark.parametrize("resume", [False, True])
def test_tensorboard_event_file_holds_the_runs_scalars_and_images(tmp_path, resume):
    common = ["logger=tensorboard", "logger.image_every=2", "trainer.vis_every=2", *EVAL]
    if resume:  # a resumed run appends to the same folder: one continuous curve
        run(make_cfg("trainer.max_steps=2", *common), tmp_path)
    run(make_cfg("trainer.max_steps=4", *common), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    acc = read_events(tmp_path)
    tags = acc.Tags()
    train = [r for r in rows if "loss" in r]
    for key in ("loss", "lr", "grad_norm", "images_per_s"):
        events = acc.Scalars(f"train/{key}")
        assert [e.step for e in events] == [r["step"] for r in train], key
        assert [e.value for e in events] == pytest.approx([r[key] for r in train], rel=1e-6), key
    evals = [r for r in rows if "eval/knn_top1" in r]
    assert evals, "the run evaluated"
    assert [e.value for e in acc.Scalars("eval/knn_top1")] == pytest.approx([r["eval/knn_top1"] for r in evals])
    images = acc.Images("reconstruction")
    assert sorted({e.step for e in images}) == [2, 4]
    assert images[-1].height > 3 * 64 and images[-1].width >= 64  # original / masked / reconstruction rows
    assert "reconstruction" in tags["images"]


def test_an_unknown_logger_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="logger=none, wandb, tensorboard or wandb\\+tensorboard"):
        run(make_cfg("logger.name=tensorbord"), tmp_path)


def test_wandb_and_tensorboard_together(tmp_path):
    run(make_cfg("trainer.max_steps=2", "logger=wandb+tensorboard", "logger.mode=disabled"), tmp_path)
    assert [e.step for e in read_events(tmp_path).Scalars("train/loss")] == [1, 2]

"""``encoder.dwconv=auto`` picks by measured speed (issue 49 item 3): after the self-test, the faster of the
tile kernel and the canvas at each stage, both timings said, the choice recorded in the run directory and
reused on resume on the same GPU (so a run's numerics do not flip). Driven here by a fake timer."""
import json
import logging

import pytest

from fcmae.models import create_fcmae
from fcmae.sparse.dwconv_choice import CHOICE_FILE, auto_by_speed, choose_by_speed, stage_rows

KEY = {"device": "NVIDIA H200", "dtype": "bf16", "dims": [128, 256, 512, 1024], "batch": 128, "img_size": 224,
       "mask_ratio": 0.6}


def fake_timer(ms: dict):
    calls = []

    def measure(path, stage):
        calls.append((path, stage))
        return ms[path][stage]
    return measure, calls


def test_the_faster_path_wins_at_each_stage_and_both_timings_are_kept():
    measure, calls = fake_timer({"tiles": [0.20, 0.10, 0.30, 0.05], "canvas": [0.40, 0.12, 0.25, 0.09]})
    choice, timings = choose_by_speed(measure, 4)
    assert choice == ["tiles", "tiles", "canvas", "tiles"]
    assert timings[2] == {"tiles": 0.30, "canvas": 0.25}
    assert sorted(calls) == sorted((p, s) for p in ("tiles", "canvas") for s in range(4))


def test_the_choice_is_recorded_and_reused_on_resume_on_the_same_gpu_only(tmp_path):
    measure, calls = fake_timer({"tiles": [0.2, 0.3, 0.3, 0.3], "canvas": [0.4, 0.1, 0.1, 0.1]})
    choice, how = auto_by_speed(tmp_path, KEY, measure, 4)
    assert choice == ["tiles", "canvas", "canvas", "canvas"] and "stage 0 0.200 / 0.400" in how
    record = json.loads((tmp_path / CHOICE_FILE).read_text())
    assert record["choice"] == choice and record["key"] == KEY and record["timings"][1] == {"tiles": 0.3, "canvas": 0.1}

    def never(path, stage):
        raise AssertionError("a resume on the same GPU must not time again")
    again, how = auto_by_speed(tmp_path, KEY, never, 4)
    assert again == choice and "recorded in" in how
    other = {**KEY, "device": "NVIDIA H100 80GB HBM3"}  # another GPU: measured anew
    measure2, calls2 = fake_timer({"tiles": [0.1] * 4, "canvas": [0.2] * 4})
    assert auto_by_speed(tmp_path, other, measure2, 4)[0] == ["tiles"] * 4 and len(calls2) == 8


def test_the_app_takes_the_per_stage_choice_and_says_both_timings(tmp_path, monkeypatch, caplog):
    import fcmae.sparse.dwconv_choice as choice_mod
    from fcmae.distributed import DistInfo
    from fcmae.pretrain import choose_dwconv
    from test_pretrain import make_cfg
    monkeypatch.setattr(choice_mod, "resolve_dwconv", lambda *a, **k: ("tiles", "its self-test passed"))
    measure, _ = fake_timer({"tiles": [0.2, 0.1, 0.3, 0.1], "canvas": [0.3, 0.2, 0.1, 0.2]})
    model = create_fcmae("convnextv2_atto")
    with caplog.at_level(logging.INFO, logger="fcmae"):
        got = choose_dwconv(model, make_cfg(), DistInfo(), "bf16", tmp_path, measure=measure)
    assert got == ["tiles", "tiles", "canvas", "tiles"] == model.encoder.dwconv
    assert "depthwise conv by stage: tiles, tiles, canvas, tiles" in caplog.text and "0.300 / 0.100" in caplog.text
    assert (tmp_path / CHOICE_FILE).is_file()
    # the encoder runs each stage with its own choice: mixed equals all-canvas (the tiles in the interpreter)
    import torch
    from conftest import rel_err
    imgs, mask = torch.randn(2, 3, 64, 64), torch.tensor([[0, 1, 0, 0], [1, 0, 0, 1]])
    model.encoder.dwconv = "canvas"
    ref = model.encoder(imgs, mask)
    model.encoder.dwconv = ["tiles", "canvas", "tiles", "canvas"]
    assert rel_err(model.encoder(imgs, mask), ref) < 1e-5


def test_stage_rows_counts_the_active_sites():
    assert stage_rows(128, 224, 0.6) == [128 * 19 * 64, 128 * 19 * 16, 128 * 19 * 4, 128 * 19]

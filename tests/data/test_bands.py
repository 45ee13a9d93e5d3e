"""Pretraining on the images people have (#32): greyscale, 16-bit and multi-band files, end to end.
Readers against the arrays written (per dtype and layout), the channel checks, fcmae-stats against
NumPy, the stem adaptation against a hand computation, N-band exports loading strict in timm and
transformers, reconstruction images, and a 12-band learning test."""
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fcmae.config import ConfigError
from fcmae.data.image_io import Channels, DataError
from fcmae.data.samples import seeded_rngs
from fcmae.data.sources import scan_folder, scan_image_folder
from fcmae.data.stats import band_stats
from fcmae.data.stats import main as stats_main
from fcmae.data.transforms import pretrain_transform
from fcmae.export.convert import adapt_stem
from fcmae.pretrain import run

from test_pretrain import make_cfg, metrics

SCALE = {np.uint8: 255.0, np.uint16: 65535.0, np.int16: 32767.0, np.float32: 1.0}


def band_array(h, w, c, dtype, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == np.float32:
        return rng.normal(0.3, 2.0, (h, w, c)).astype(np.float32)  # floats keep their own units
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -1000), info.max, (h, w, c), dtype=dtype, endpoint=True)


# ---------------------------------------------------------------- readers

@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
@pytest.mark.parametrize("layout", ["hwc", "chw"])
def test_npy_arrays_read_in_their_units_for_every_dtype_and_layout(tmp_path, dtype, layout):
    a = band_array(20, 30, 5, dtype)
    np.save(tmp_path / "x.npy", a if layout == "hwc" else np.moveaxis(a, -1, 0))
    x = Channels("all", None, 5, layout).read(tmp_path / "x.npy")
    want = torch.from_numpy(a.astype(np.float64) / SCALE[dtype]).permute(2, 0, 1).float()
    assert x.shape == (5, 20, 30) and x.dtype == torch.float32
    assert torch.allclose(x, want, rtol=1e-6, atol=1e-7)
    picked = Channels("all", (4, 0), 2, layout).read(tmp_path / "x.npy")
    assert torch.equal(picked, x[[4, 0]])  # data.bands: those bands, in that order


def test_tiffs_multi_page_and_multi_sample_give_every_band_in_order(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    a = band_array(16, 24, 13, np.uint16)  # a Sentinel-2-like stack
    tifffile.imwrite(tmp_path / "pages.tif", np.moveaxis(a, -1, 0))  # 13 pages of (H, W)
    tifffile.imwrite(tmp_path / "samples.tiff", a[..., :4], photometric="minisblack", planarconfig="contig")
    want = torch.from_numpy(a / 65535.0).permute(2, 0, 1).float()
    assert torch.allclose(Channels("all", None, 13).read(tmp_path / "pages.tif"), want)
    assert torch.allclose(Channels("all", None, 4).read(tmp_path / "samples.tiff"), want[:4])


def test_sixteen_bit_greyscale_and_rgb_as_one_band(tmp_path):
    a = band_array(12, 10, 1, np.uint16)[..., 0]
    Image.fromarray(a).save(tmp_path / "g16.png")  # a 16-bit PNG (mode I;16)
    grey = Channels("grey", None, 1).read(tmp_path / "g16.png")
    assert torch.allclose(grey[0], torch.from_numpy(a / 65535.0).float())  # not clipped at 255, not 8 bits
    rgb = band_array(12, 10, 3, np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    luma = (rgb / 255.0) @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, by hand
    assert torch.allclose(Channels("grey", None, 1).read(tmp_path / "c.png")[0], torch.from_numpy(luma).float(),
                          atol=1e-6)
    plain = Channels().read(tmp_path / "c.png")  # the default stays the 8-bit RGB PIL path
    assert isinstance(plain, Image.Image) and plain.mode == "RGB"


def test_a_band_count_that_disagrees_is_a_clear_error():
    with pytest.raises(DataError, match=r"12 bands; the run takes 3 \(model.in_chans\)"):
        Channels("all", None, 3).convert(np.zeros((4, 4, 12), np.uint16))
    with pytest.raises(DataError, match="data.channels=rgb takes 1, 3 or 4"):
        Channels("rgb", None, 3).convert(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(DataError, match="pixels of type uint32"):
        Channels("all", None, 2).convert(np.zeros((4, 4, 2), np.uint32))


def test_tensors_get_the_crop_and_flip_of_the_rgb_path(tmp_path):
    """Same seed, same crop and flip: a 3-band array and the same pixels as an 8-bit PNG give the same
    augmented image (within the two resize implementations), so resume and per-sample seeds hold."""
    rgb = band_array(90, 120, 3, np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    np.save(tmp_path / "a.npy", rgb)
    t = pretrain_transform(64, (0.2, 1.0), True)
    for seed in range(6):
        with seeded_rngs(seed):
            from_png = t(Channels().read(tmp_path / "a.png"))
        with seeded_rngs(seed):
            from_npy = t(Channels("all", None, 3).read(tmp_path / "a.npy"))
        assert (from_png - from_npy).abs().mean() < 0.02  # one 8-bit level is 0.0175 normalised


# ---------------------------------------------------------------- the app's checks

def npy_folder(root: Path, n: int, bands: int, dtype=np.uint16, size=(70, 80)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        np.save(root / f"{i:03d}.npy", band_array(*size, bands, dtype, seed=i))
    return root


def test_model_in_chans_is_checked_against_the_data_at_start(tmp_path):
    folder = npy_folder(tmp_path / "imgs", 8, 5)
    with pytest.raises(DataError, match=r"000.npy has 5 bands; the run takes 3 .*set model.in_chans"):
        run(make_cfg("data.source=folder", f"data.root={folder}", "data.channels=all", "data.mean=auto"),
            tmp_path / "run")
    with pytest.raises(ConfigError, match="model.in_chans=1 with data.channels=rgb") as err:
        run(make_cfg("model.in_chans=1"), tmp_path / "run2")
    assert "data.mean=[0.485, 0.456, 0.406] needs 1 numbers" in str(err.value)  # every problem at once


def test_a_multi_band_run_end_to_end_with_auto_stats(tmp_path, caplog):
    """12-band uint16 files: data.mean=auto computed at start equals band_stats over the same draw and
    travels in the checkpoint; the reconstruction image shows vis.bands; a file with 11 bands is
    skipped, named and counted like an unreadable one."""
    from fcmae.storage.checkpoint import load_checkpoint
    from fcmae.data.samples import PretrainSamples
    folder = npy_folder(tmp_path / "imgs", 16, 12)
    state = run(make_cfg("data.source=folder", f"data.root={folder}", "data.channels=all", "model.in_chans=12",
                         "data.mean=auto", "data.stats_images=8", "trainer.max_steps=4", "trainer.vis_every=4",
                         "vis.bands=[11,5,0]"), tmp_path / "run")
    assert state.step == 4
    ck = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    source = scan_folder(folder, Channels("all", None, 12))
    mean, std = band_stats(source, 8, 0, progress="log")
    assert ck["config"]["data"]["mean"] == mean and ck["config"]["data"]["std"] == std and len(mean) == 12
    assert ck["model"]["encoder.downsample_layers.0.0.weight"].shape[1] == 12
    assert Image.open(tmp_path / "run/reconstructions/step-0000004.png").mode == "RGB"
    np.save(folder / "000.npy", band_array(70, 80, 11, np.uint16))  # now the first file has a band too few
    samples = PretrainSamples(scan_folder(folder, Channels("all", None, 12)), pretrain_transform(64, mean=mean, std=std),
                              64, 0.5)
    with caplog.at_level(logging.WARNING, logger="fcmae"):
        x, _, bad, _ = samples[0]
    assert bad == 1 and x.shape == (12, 64, 64)
    assert "000.npy" in caplog.text and "11 bands; the run takes 12" in caplog.text


def test_band_stats_match_numpy_and_the_command_prints_the_override(tmp_path, capsys):
    folder = npy_folder(tmp_path / "imgs", 6, 4, size=(10, 14))
    arrays = [np.load(p).astype(np.float64) / 65535.0 for p in sorted(folder.iterdir())]
    stacked = np.concatenate([a.reshape(-1, 4) for a in arrays])
    mean, std = band_stats(scan_folder(folder, Channels("all", None, 4)), images=100, progress="log")
    assert np.allclose(mean, stacked.mean(0), atol=1e-6) and np.allclose(std, stacked.std(0), atol=1e-6)
    assert stats_main([str(folder), "--channels", "all"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("data.mean=[") and line.endswith("model.in_chans=4")
    assert stats_main([str(folder), "--channels", "all", "--json", "--images", "3", "--seed", "1"]) == 0
    drawn = json.loads(capsys.readouterr().out)
    again = band_stats(scan_folder(folder, Channels("all", None, 4)), images=3, seed=1, progress="log")
    assert [drawn["mean"], drawn["std"]] == [list(again[0]), list(again[1])]  # deterministic for a seed
    five = npy_folder(tmp_path / "five", 2, 5, size=(10, 14))
    assert stats_main([str(five)]) == 2  # 5 bands under rgb: a clear error, exit 2
    assert "data.channels=rgb takes 1, 3 or 4" in capsys.readouterr().err


# ---------------------------------------------------------------- export, fine-tune, stem adaptation

def test_rgb_weights_adapt_to_one_and_five_bands_as_computed_by_hand():
    w = torch.randn(40, 3, 4, 4)
    one, how = adapt_stem({"downsample_layers.0.0.weight": w}, 1)
    assert torch.allclose(one["downsample_layers.0.0.weight"], (w[:, 0] + w[:, 1] + w[:, 2]).unsqueeze(1))
    assert "1 band" in how
    five, _ = adapt_stem({"downsample_layers.0.0.weight": w}, 5)
    hand = torch.stack([w[:, 0], w[:, 1], w[:, 2], w[:, 0], w[:, 1]], dim=1) * 3 / 5
    assert torch.allclose(five["downsample_layers.0.0.weight"], hand)
    grey = torch.rand(2, 1, 8, 8)  # the adapted stem answers a band image as the RGB one a grey image
    rgb_out = torch.nn.functional.conv2d(grey.expand(-1, 3, -1, -1), w, stride=4)
    assert torch.allclose(torch.nn.functional.conv2d(grey, one["downsample_layers.0.0.weight"], stride=4), rgb_out,
                          atol=1e-5)
    same, none = adapt_stem({"downsample_layers.0.0.weight": w}, 3)
    assert none is None and same["downsample_layers.0.0.weight"] is w
    with pytest.raises(Exception, match="only RGB"):
        adapt_stem({"downsample_layers.0.0.weight": torch.randn(40, 5, 4, 4)}, 2)


def test_an_n_band_export_loads_strict_in_timm_and_transformers(tmp_path):
    import timm
    from fcmae.export.exporter import export
    from fcmae.storage.weights_file import load_state_dict_file
    folder = npy_folder(tmp_path / "imgs", 8, 7)
    run(make_cfg("data.source=folder", f"data.root={folder}", "data.channels=all", "model.in_chans=7",
                 f"data.mean=[{','.join(['0.5'] * 7)}]", f"data.std=[{','.join(['0.29'] * 7)}]",
                 "trainer.max_steps=1"), tmp_path / "run")
    out = export(tmp_path / "run", "timm", tmp_path / "enc.safetensors")  # verified inside against the sparse encoder
    model = timm.create_model("convnextv2_atto", num_classes=0, in_chans=7)
    model.load_state_dict(load_state_dict_file(out), strict=True)
    pytest.importorskip("transformers")
    hf = export(tmp_path / "run", "hf", tmp_path / "enc-hf")
    config = json.loads((hf / "config.json").read_text())
    pre = json.loads((hf / "preprocessor_config.json").read_text())
    assert config["num_channels"] == 7 and pre["image_mean"] == [0.5] * 7 and pre["image_std"] == [0.29] * 7


def band_set(root: Path, per_class: int, seed: int, size: int = 64, bands: int = 12, classes: int = 4) -> Path:
    """An ImageFolder of 12-band uint16 arrays whose class lives only in bands 6-9 (band 6 + c is
    brighter, under noise); bands 0-2, the "RGB" ones, carry noise only."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.uniform(0.2, 0.6, (size, size, bands))
            img[..., 6 + c] += rng.uniform(0.15, 0.3)
            np.save(root / f"class{c}" / f"{i:03d}.npy", (img * 65535).astype(np.uint16))
    return root


@pytest.mark.slow
def test_twelve_bands_learn_what_three_rgb_bands_cannot(tmp_path):
    """Pretrain + fine-tune on all 12 bands vs the same pipeline on bands 0-2 only: the cue is in bands
    6-9, so 12 bands must reach a high top-1 while 3 stay near chance (25%)."""
    from hydra import compose, initialize_config_dir

    from fcmae.config import CONFIG_PATH
    from fcmae.finetune import run as finetune
    train, val = band_set(tmp_path / "train", 16, 0), band_set(tmp_path / "val", 8, 1)
    top1 = {}
    for name, bands in (("all12", None), ("rgb3", [0, 1, 2])):
        pick = [f"data.bands=[{','.join(map(str, bands))}]"] if bands else []
        chans = len(bands) if bands else 12
        run(make_cfg("data.source=imagefolder", f"data.root={train}", "data.channels=all", f"model.in_chans={chans}",
                     *pick, "data.mean=auto", "trainer.max_steps=4"), tmp_path / f"pre-{name}")
        stats = torch.load(next((tmp_path / f"pre-{name}/checkpoints").glob("checkpoint-*.pt")),
                           weights_only=False)["config"]["data"]
        with initialize_config_dir(config_dir=CONFIG_PATH, version_base=None):
            cfg = compose("finetune", overrides=[
                "data.source=imagefolder", f"data.train_root={train}", f"data.val_root={val}", "data.channels=all",
                f"model.in_chans={chans}", *pick, "data.img_size=64", "data.batch_size=16", "data.num_workers=0",
                f"data.mean=[{','.join(map(str, stats['mean']))}]", f"data.std=[{','.join(map(str, stats['std']))}]",
                f"model.init_from={tmp_path / f'pre-{name}'}", "trainer.epochs=4", "trainer.progress=log",
                "schedule.warmup_steps=0", "optim.lr=2e-3", "data.re_prob=0"])
            finetune(cfg, tmp_path / f"ft-{name}")
        top1[name] = [m for m in metrics(tmp_path / f"ft-{name}") if "val/top1" in m][-1]["val/top1"]
    print("top-1", top1)
    assert top1["all12"] >= 80 and top1["rgb3"] <= 50, top1


def test_fashion_mnist_is_natively_one_band_under_grey():
    """data.channels=grey reads Fashion-MNIST as the 1-band images it is (the default replicates them
    to 3 channels); the pixels are the IDX bytes / 255."""
    from fcmae.data.fashion_mnist import DEFAULT_ROOT, FashionMNIST
    if not (Path(DEFAULT_ROOT) / "t10k-images-idx3-ubyte.gz").is_file() and not os.environ.get("FCMAE_REQUIRE_FMNIST"):
        pytest.skip("Fashion-MNIST is not installed (sudo apt-get install dataset-fashion-mnist)")
    grey = FashionMNIST(split="test", channels=Channels("grey", None, 1))
    x, label = grey[7]
    assert x.shape == (1, 28, 28) and label == int(grey.labels[7])
    assert torch.equal(x[0], torch.tensor(grey.images[7], dtype=torch.float32) / 255)
    rgb, _ = FashionMNIST(split="test")[7]
    assert rgb.mode == "RGB" and np.array_equal(np.asarray(rgb)[..., 0], grey.images[7])


def test_rgb_weights_start_a_one_band_model_in_both_apps(tmp_path, caplog):
    """init_from (pretraining) and model.init_from (fine-tuning) with RGB weights and model.in_chans=1:
    the stem starts from the sum of the RGB filters, with a warning; the rest loads unchanged."""
    import timm
    from fcmae import create_fcmae
    from fcmae.export.convert import to_dense
    from fcmae.finetune import build_classifier, load_pretrained
    from fcmae.pretrain import load_encoder_init
    from fcmae.storage.weights_file import save_state_dict
    rgb = create_fcmae("convnextv2_atto").state_dict()
    save_state_dict(to_dense(rgb, "timm"), tmp_path / "rgb.safetensors")
    stem = rgb["encoder.downsample_layers.0.0.weight"]
    grey_mae = create_fcmae("convnextv2_atto", in_chans=1)
    with caplog.at_level(logging.WARNING, logger="fcmae"):
        load_encoder_init(grey_mae, str(tmp_path / "rgb.safetensors"))
    assert torch.allclose(grey_mae.encoder.downsample_layers[0][0].weight, stem.sum(1, keepdim=True), atol=1e-6)
    assert torch.equal(grey_mae.encoder.stages[3][1].pwconv2.weight, rgb["encoder.stages.3.1.pwconv2.weight"])
    assert "holds RGB weights; model.in_chans=1" in caplog.text
    classifier = build_classifier("convnextv2_atto", 10, 0.0, 1.0, in_chans=1)
    load_pretrained(classifier, "convnextv2_atto", str(tmp_path / "rgb.safetensors"))
    assert torch.allclose(classifier.stem[0].weight, stem.sum(1, keepdim=True), atol=1e-6)
    assert isinstance(classifier, timm.models.ConvNeXt)

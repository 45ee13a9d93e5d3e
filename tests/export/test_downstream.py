"""Exports as backbones (#41): a timm model folder that describes its own input (timm builds it with
the run's mean/std, also as a ``features_only`` backbone whose four maps equal the encoder's dense
stages, RGB and 12-band), and that backbone under a torchvision detector and a segmentation head,
each taking a training step."""
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from fcmae.export.convert import to_canonical
from fcmae.export.exporter import export
from fcmae.models.convnextv2 import ConvNeXtV2
from fcmae.models.fcmae import FCMAE
from fcmae.pretrain import run
from fcmae.storage.checkpoint import load_checkpoint

from conftest import rel_err
from test_pretrain import make_cfg

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("source")
    run(make_cfg("trainer.max_steps=2"), run_dir)
    return run_dir


def _stages(canonical, imgs):
    """The encoder's four dense stage outputs (the independent reference)."""
    in_chans = canonical["downsample_layers.0.0.weight"].shape[1]
    model = ConvNeXtV2((2, 2, 6, 2), (40, 80, 160, 320), in_chans, num_classes=0).eval()
    model.load_state_dict(canonical, strict=False)  # norm/head: not the encoder's
    outs, x = [], imgs
    with torch.no_grad():
        for down, stage in zip(model.downsample_layers, model.stages):
            x = stage(down(x))
            outs.append(x)
    return outs


def _backbone(folder):
    return timm.create_model(f"local-dir:{folder}", pretrained=True, features_only=True, out_indices=(0, 1, 2, 3))


def test_a_timm_folder_carries_the_run_s_normalisation_and_builds_a_features_only_backbone(source_run, tmp_path):
    out = export(source_run, "timm-dir", out=tmp_path / "atto", log=lambda _: None)
    ck = load_checkpoint(source_run / "checkpoints/last.pt")
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert list(data_cfg["mean"]) == pytest.approx(ck["config"]["data"]["mean"])
    assert list(data_cfg["std"]) == pytest.approx(ck["config"]["data"]["std"])
    imgs = torch.randn(2, 3, 64, 64)
    feats = _backbone(out).eval()(imgs)
    ref = _stages(to_canonical(ck)[0], imgs)
    assert [f.shape[1] for f in feats] == [40, 80, 160, 320]
    assert max(rel_err(a, b) for a, b in zip(feats, ref)) < 1e-5


def _twelve_band_checkpoint(tmp_path):
    fcmae = FCMAE(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), in_chans=12, decoder_embed_dim=32)
    config = {"model": {"in_chans": 12}, "data": {"img_size": 64, "channels": "all", "bands": None,
                                                  "mean": [0.1 * i for i in range(12)], "std": [0.5] * 12}}
    torch.save({"model": fcmae.state_dict(), "config": config, "pixel_type": "uint16"}, tmp_path / "twelve.pt")
    return tmp_path / "twelve.pt", fcmae


def test_a_twelve_band_export_builds_the_same_way(tmp_path):
    source, fcmae = _twelve_band_checkpoint(tmp_path)
    out = export(source, "timm-dir", out=tmp_path / "twelve", log=lambda _: None)
    assert '"in_chans": 12' in (out / "config.json").read_text() and "65535" in (out / "config.json").read_text()
    imgs = torch.randn(1, 12, 64, 64)
    feats = _backbone(out).eval()(imgs)
    ref = _stages(to_canonical({"model": fcmae.state_dict()})[0], imgs)
    assert max(rel_err(a, b) for a, b in zip(feats, ref)) < 1e-5


class FeaturePyramid(nn.Module):
    """A timm ``features_only`` backbone under torchvision's FPN: what torchvision's detectors take."""

    def __init__(self, body, out_channels: int = 32):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
        self.body, self.out_channels = body, out_channels
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), out_channels, extra_blocks=LastLevelMaxPool())

    def forward(self, x):
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))


def _changed_after_one_step(model, loss_fn):
    first = next(model.parameters()).detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = loss_fn()
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    return not torch.equal(first, next(model.parameters()))


@pytest.mark.slow
def test_a_torchvision_detector_and_a_segmentation_head_train_a_step_on_the_backbone(source_run, tmp_path):
    from torchvision.models.detection import FasterRCNN
    folder = export(source_run, "timm-dir", out=tmp_path / "atto", log=lambda _: None, verify=False)
    detector = FasterRCNN(FeaturePyramid(_backbone(folder)), num_classes=3, min_size=128, max_size=128).train()
    images = [torch.rand(3, 128, 128) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[30.0, 30.0, 100.0, 120.0]]), "labels": torch.tensor([2])}]
    assert _changed_after_one_step(detector, lambda: sum(detector(images, targets).values()))

    backbone = _backbone(folder)
    head = nn.Conv2d(backbone.feature_info.channels()[0], 4, 1)
    segmenter = nn.ModuleDict({"backbone": backbone, "head": head}).train()
    x, masks = torch.rand(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64))

    def seg_loss():
        logits = nn.functional.interpolate(head(backbone(x)[0]), size=(64, 64), mode="bilinear")
        return nn.functional.cross_entropy(logits, masks)
    assert _changed_after_one_step(segmenter, seg_loss)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 16])
def test_the_hf_processor_reproduces_the_pretraining_input(tmp_path, bits):
    """Before: rescale 1/255 always, so a 16-bit band reached the model ~257x too large."""
    import numpy as np
    from PIL import Image
    transformers = pytest.importorskip("transformers")
    from fcmae.data.image_io import Channels
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        if bits == 16:
            np.save(root / f"{i}.npy", rng.integers(0, 65535, (64, 64, 3), dtype=np.uint16))
        else:
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / f"{i}.png")
    channels = ["data.channels=all"] if bits == 16 else []
    run(make_cfg("data.source=folder", f"data.root={root}", *channels, "data.mean=[0.3,0.5,0.4]",
                 "data.std=[0.2,0.25,0.3]", "trainer.max_steps=1"), tmp_path / "run")
    folder = export(tmp_path / "run", "hf", tmp_path / "hf", log=lambda _: None, verify=False)
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    file = next(root.iterdir())
    raw = np.load(file) if bits == 16 else np.asarray(Image.open(file))
    got = processor(raw, do_resize=False, return_tensors="pt")["pixel_values"][0]
    read = Channels("all" if bits == 16 else "rgb", None, 3).read(file)
    x = read if bits == 16 else torch.from_numpy(np.asarray(read, dtype=np.float32) / 255).permute(2, 0, 1)
    want = (x - torch.tensor([0.3, 0.5, 0.4])[:, None, None]) / torch.tensor([0.2, 0.25, 0.3])[:, None, None]
    assert torch.allclose(got.float(), want, atol=1e-5), (got - want).abs().max()


@pytest.mark.slow
def test_fine_tuning_takes_the_normalisation_of_its_source_or_computes_it(tmp_path, caplog):
    """Before: a 4-band init without data.mean stopped asking for 4 numbers, and data.mean=auto was refused."""
    import logging
    import numpy as np
    from test_finetune import FT_TINY, compose_cfg
    from fcmae.finetune import run as finetune
    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "tiles" / f"c{c}").mkdir(parents=True)
        for i in range(4):
            np.save(tmp_path / "tiles" / f"c{c}" / f"{i}.npy", rng.integers(0, 65535, (64, 64, 4), dtype=np.uint16))
    tiles = tmp_path / "tiles"
    run(make_cfg("data.source=imagefolder", f"data.root={tiles}", "data.channels=all", "model.in_chans=4",
                 "data.mean=auto", "trainer.max_steps=1"), tmp_path / "pre")
    pre_mean = load_checkpoint(tmp_path / "pre/checkpoints/last.pt")["config"]["data"]["mean"]
    data = [*FT_TINY, "data.source=imagefolder", f"data.train_root={tiles}", f"data.val_root={tiles}",
            "data.channels=all", "model.in_chans=4", "trainer.max_steps=1", "data.auto_augment=null"]
    with caplog.at_level(logging.INFO, logger="fcmae"):
        finetune(compose_cfg("finetune", *data, f"model.init_from={tmp_path / 'pre'}"), tmp_path / "ft")
    assert "from model.init_from=" in caplog.text and "uint16 files" in caplog.text
    assert load_checkpoint(tmp_path / "ft/checkpoints/last.pt")["config"]["data"]["mean"] == pytest.approx(pre_mean)
    finetune(compose_cfg("finetune", *data, "data.mean=auto"), tmp_path / "ft_auto")
    auto_mean = load_checkpoint(tmp_path / "ft_auto/checkpoints/last.pt")["config"]["data"]["mean"]
    assert len(auto_mean) == 4 and auto_mean == pytest.approx([0.5] * 4, abs=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("bands", [3, 12])
def test_transformers_backbone_builds_from_the_hf_export_and_agrees_with_the_encoder(source_run, tmp_path, bands):
    """transformers' ConvNextV2Backbone (what AutoBackbone resolves a convnextv2 config to) from our HF
    folder: its four maps are the encoder's stages under the backbone's own, freshly initialised,
    per-stage LayerNorms (weight 1, bias 0)."""
    transformers = pytest.importorskip("transformers")
    if bands == 3:
        source, ck = source_run, load_checkpoint(source_run / "checkpoints/last.pt")
    else:
        source, model = _twelve_band_checkpoint(tmp_path)
        ck = {"model": model.state_dict()}
    folder = export(source, "hf", out=tmp_path / "hf", log=lambda _: None, verify=False)
    config = transformers.AutoConfig.from_pretrained(folder)
    assert type(transformers.AutoBackbone.from_config(config)).__name__ == "ConvNextV2Backbone"
    backbone = transformers.ConvNextV2Backbone.from_pretrained(
        folder, out_features=["stage1", "stage2", "stage3", "stage4"]).eval()
    imgs = torch.randn(2, bands, 64, 64)
    with torch.no_grad():
        maps = backbone(imgs).feature_maps
    ref = _stages(to_canonical(ck)[0], imgs)
    normed = [nn.functional.layer_norm(r.permute(0, 2, 3, 1), r.shape[1:2], eps=config.layer_norm_eps).permute(0, 3, 1, 2)
              for r in ref]
    assert max(rel_err(a, b) for a, b in zip(maps, normed)) < 1e-5

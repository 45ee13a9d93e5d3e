"""Non-square images (#50): ``data.img_size=[H, W]`` through the crops, the rectangular mask grid, the
model, the checkpoint, the exports and fine-tuning; square stays the default, and a shape that is no
multiple of the patch, or not a shape at all, is refused before anything runs."""
import json

import pytest
import torch

from fcmae.config import ConfigError
from fcmae.data.sources import SyntheticImages
from fcmae.data.samples import PretrainSamples
from fcmae.data.transforms import eval_transform, pretrain_transform
from fcmae.export.exporter import export
from fcmae.models.fcmae import FCMAE
from fcmae.models.masking import image_shape
from fcmae.pretrain import run
from fcmae.storage.checkpoint import load_checkpoint
from fcmae.storage.weights_file import load_state_dict_file

from conftest import rel_err
from test_finetune import FT_TINY, compose_cfg
from test_pretrain import assert_resume_is_bit_identical, make_cfg

from fcmae.finetune import run as finetune


def test_a_shape_is_one_size_or_height_and_width():
    assert image_shape(224) == (224, 224) and image_shape([224, 160]) == (224, 160)
    for bad in ([224], [224, 160, 3], "224", [224.0, 160], True):
        with pytest.raises(ValueError, match=r"one size \(224\) or \[height, width\]"):
            image_shape(bad)


def test_the_pipeline_crops_and_masks_a_rectangle():
    """Every sample comes out [C, H, W] and its mask covers the (H/32) x (W/32) grid at the run's ratio;
    the evaluation transform centre-crops the same shape."""
    source = SyntheticImages(4, size=256)
    data = PretrainSamples(source, pretrain_transform([96, 64]), [96, 64], 0.5)
    x, mask, _, _ = data[1]
    assert x.shape == (3, 96, 64) and mask.shape == (3 * 2,) and int(mask.sum()) == 3
    img, _ = source[0]
    assert eval_transform([96, 64], 0.875, (0.5,) * 3, (0.25,) * 3)(img).shape == (3, 96, 64)


@pytest.mark.slow  # two runs of 6 steps at 224x160 on the CPU
def test_a_224x160_run_trains_and_resumes_exactly(tmp_path):
    assert_resume_is_bit_identical(tmp_path, ["data.img_size=[224,160]", "trainer.max_steps=4", "data.batch_size=2"])
    ck = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    assert list(ck["config"]["data"]["img_size"]) == [224, 160]


@pytest.mark.slow  # pretraining, three exports and a fine-tuning run: ~20 s (full set)
def test_a_rectangular_run_exports_and_fine_tunes(tmp_path):
    run_dir = tmp_path / "pre"
    run(make_cfg("data.img_size=[96,64]", "trainer.max_steps=2", "trainer.vis_every=2"), run_dir)
    ck = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert list(ck["config"]["data"]["img_size"]) == [96, 64]
    assert (run_dir / "reconstructions" / "step-0000002.png").is_file()
    # the timm folder says the input's shape; the weights equal the encoder's dense outputs
    folder = export(run_dir, "timm-dir", out=tmp_path / "folder", log=lambda _: None)
    config = json.loads((folder / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 96, 64]
    timm = pytest.importorskip("timm")
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    m = ck["config"]["model"]
    ours = FCMAE(m["depths"], m["dims"], decoder_embed_dim=m["decoder_embed_dim"]).eval()
    ours.load_state_dict(ck["model"])
    imgs = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        assert rel_err(model.forward_features(imgs), ours.forward_encoder(imgs, torch.zeros(2, 6))) < 1e-5
    said = []
    export(run_dir, "hf", out=tmp_path / "hf", log=said.append)
    assert any("96x64" in s and "crops square" in s for s in said)
    # fine-tuning at the same rectangle, from the export
    weights = export(run_dir, "timm", out=tmp_path / "w.safetensors", log=lambda _: None)
    ft_dir = tmp_path / "ft"
    finetune(compose_cfg("finetune", *FT_TINY, "data.img_size=[96,64]", f"model.init_from={weights}",
                         "trainer.max_steps=1"), ft_dir)
    ft = load_checkpoint(ft_dir / "checkpoints" / "last.pt")
    assert list(ft["config"]["data"]["img_size"]) == [96, 64] and ft["step"] == 1
    assert rel_err(ft["model"]["stem.0.weight"], load_state_dict_file(weights)["stem.0.weight"]) < 0.1


@pytest.mark.parametrize("size,said", [("[100,64]", r"\[100, 64\] must be positive multiples of model.patch_size=32"),
                                        ("[64,64,3]", r"one size \(224\) or \[height, width\]")])
def test_a_shape_the_model_cannot_take_is_refused_before_the_run(tmp_path, size, said):
    with pytest.raises(ConfigError, match=said):
        run(make_cfg(f"data.img_size={size}"), tmp_path / "run")
    assert not (tmp_path / "run").exists()

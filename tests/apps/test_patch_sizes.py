"""Pretraining at 16- and 8-pixel patches end to end (#50, the MMEarth-style small tiles): the app trains
at ``model.patch_size=16`` on 112-px images and at 8 on 56-px ones, the checkpoint's model has the stem
and the decoder of that patch, the export loads strict into timm (``patch_size=`` its stem) and into
transformers equal to the sparse encoder's dense outputs, and fine-tuning from it reads the patch from the
weights."""
import json

import pytest
import torch

from fcmae.export.exporter import export
from fcmae.models.timm_convnextv2 import timm_convnextv2
from fcmae.finetune import run as finetune
from fcmae.models.fcmae import FCMAE
from fcmae.storage.checkpoint import load_checkpoint
from fcmae.storage.weights_file import CheckpointError, load_state_dict_file

from conftest import rel_err
from test_finetune import FT_TINY, compose_cfg
from test_pretrain import make_cfg

from fcmae.pretrain import run as pretrain


def _pretrain(tmp_path, patch, size):
    run_dir = tmp_path / f"p{patch}"
    pretrain(make_cfg(f"model.patch_size={patch}", f"data.img_size={size}", "trainer.max_steps=2",
                      "trainer.vis_every=2"), run_dir)
    return run_dir


def _encoder_outputs(ck, patch, imgs):
    m = ck["config"]["model"]
    model = FCMAE(m["depths"], m["dims"], decoder_embed_dim=m["decoder_embed_dim"], patch_size=patch).eval()
    model.load_state_dict(ck["model"])
    with torch.no_grad():
        n, _, h, w = imgs.shape
        return model.forward_encoder(imgs, torch.zeros(n, (h // patch) * (w // patch)))


@pytest.mark.parametrize("patch,size", [(16, 112), (8, 56)])
def test_pretraining_at_a_small_patch_trains_and_exports_to_timm(tmp_path, patch, size):
    run_dir = _pretrain(tmp_path, patch, size)
    ck = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ck["step"] == 2 and ck["config"]["model"]["patch_size"] == patch
    stem = ck["model"]["encoder.downsample_layers.0.0.weight"]
    assert stem.shape[-2:] == (patch // 8, patch // 8)
    assert ck["model"]["pred.weight"].shape[0] == patch * patch * 3  # a patch's pixels a site
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2] and all(r["loss"] > 0 for r in lines if "loss" in r)
    assert (run_dir / "reconstructions" / "step-0000002.png").is_file()
    said = []
    out = export(run_dir, "timm", out=tmp_path / "atto.safetensors", log=said.append)
    assert any("verified" in s for s in said) and any(f"stride {patch // 8}" in s for s in said)
    model = timm_convnextv2("convnextv2_atto", patch // 8, num_classes=0).eval()
    model.load_state_dict(load_state_dict_file(out), strict=True)
    imgs = torch.randn(2, 3, size, size + patch)
    with torch.no_grad():
        theirs = model.forward_features(imgs)
    assert rel_err(theirs, _encoder_outputs(ck, patch, imgs)) < 1e-5


@pytest.mark.slow  # pretraining, three exports and a fine-tuning run: ~20 s (full set)
def test_a_16_pixel_export_loads_in_transformers_and_fine_tunes_with_the_patch_read_from_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    run_dir = _pretrain(tmp_path, 16, 112)
    ck = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    hf = export(run_dir, "hf", out=tmp_path / "hf", log=lambda _: None)
    assert json.loads((hf / "config.json").read_text())["patch_size"] == 2
    model = transformers.ConvNextV2Model.from_pretrained(str(hf)).eval()
    imgs = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        theirs = model(pixel_values=imgs).last_hidden_state
    assert rel_err(theirs, _encoder_outputs(ck, 16, imgs)) < 1e-5
    # a timm folder cannot hold a stride-2 stem (timm adds a downsample after it): refused, nothing written
    with pytest.raises(CheckpointError, match="16-pixel patches.*--format hf"):
        export(run_dir, "timm-dir", out=tmp_path / "folder", log=lambda _: None)
    assert not (tmp_path / "folder").exists()
    # fine-tuning: model.patch_size left null is read from the weights' stem
    timm_file = export(run_dir, "timm", out=tmp_path / "atto.safetensors", log=lambda _: None)
    ft_dir = tmp_path / "ft"
    finetune(compose_cfg("finetune", *FT_TINY, "data.img_size=112", f"model.init_from={timm_file}",
                         "trainer.max_steps=1"), ft_dir)
    ft = load_checkpoint(ft_dir / "checkpoints" / "last.pt")
    assert ft["config"]["model"]["patch_size"] == 16
    assert ft["model"]["stem.0.weight"].shape[-2:] == (2, 2) and "stages.0.downsample.1.weight" not in ft["model"]
    start = load_state_dict_file(timm_file)["stem.0.weight"]
    assert rel_err(ft["model"]["stem.0.weight"], start) < 0.1  # one step from the export, not a fresh init
    # a patch that disagrees with the weights is refused before anything trains
    with pytest.raises(Exception, match=r"model.patch_size=32 but model.init_from=.*16-pixel patches"):
        finetune(compose_cfg("finetune", *FT_TINY, "data.img_size=128", f"model.init_from={timm_file}",
                             "model.patch_size=32", "trainer.max_steps=1"), tmp_path / "ft32")
    assert not (tmp_path / "ft32" / "checkpoints").exists()

"""Continue pretraining from a full model (#41): ``fcmae-export --format fcmae`` holds the encoder, the
decoder, the mask token and the model's config; ``init_from`` keeps the decoder when the source has one
(so pretraining continues where the source stopped) and starts a fresh one, saying so, when it does not."""
import json
import logging

import pytest
import torch

from fcmae.export.exporter import export
from fcmae.pretrain import build_model, load_encoder_init, run
from fcmae.storage.checkpoint import load_checkpoint
from fcmae.storage.weights_file import CheckpointError

from test_pretrain import make_cfg


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("source")
    run(make_cfg("trainer.max_steps=3"), run_dir)
    return run_dir


def _loss(model, imgs, mask=None):
    model.eval()
    with torch.no_grad():
        loss, _, mask = model(imgs, mask=mask)
    return loss, mask


def test_a_full_export_continues_with_the_source_model_s_loss(source_run, tmp_path, caplog):
    lines = []
    out = export(source_run, "fcmae", out=tmp_path / "full.safetensors", log=lines.append)
    assert any("bit for bit" in line for line in lines)
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    config = json.loads(meta["fcmae_config"])
    assert meta["format"] == "fcmae" and config["decoder_embed_dim"] == 32 and config["in_chans"] == 3
    assert config["mean"] and config["patch_size"] == 32

    cfg = make_cfg(f"init_from={out}")
    source = build_model(cfg)
    source.load_state_dict(load_checkpoint(source_run / "checkpoints/last.pt")["model"])
    torch.manual_seed(0)
    imgs = torch.randn(4, 3, 64, 64)
    want, mask = _loss(source, imgs)

    continued = build_model(cfg)
    with caplog.at_level(logging.INFO, logger="fcmae"):
        load_encoder_init(continued, str(out))
    assert "encoder, decoder and mask token" in caplog.text
    got, _ = _loss(continued, imgs, mask)
    assert torch.equal(got, want)  # the first step's loss on this batch and mask is the source's

    caplog.clear()  # a run directory keeps its decoder too
    fresh_run = build_model(cfg)
    with caplog.at_level(logging.INFO, logger="fcmae"):
        load_encoder_init(fresh_run, str(source_run))
    assert torch.equal(_loss(fresh_run, imgs, mask)[0], want)


def test_an_encoder_only_source_starts_a_fresh_decoder_and_says_so(source_run, tmp_path, caplog):
    timm_file = export(source_run, "timm", out=tmp_path / "enc.safetensors", log=lambda _: None, verify=False)
    model = build_model(make_cfg())
    with caplog.at_level(logging.INFO, logger="fcmae"):
        load_encoder_init(model, str(timm_file))
    assert "fresh decoder (the source holds the encoder only)" in caplog.text
    wider = build_model(make_cfg("model.decoder_embed_dim=48"))  # a decoder of other shapes: fresh, said
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fcmae"):
        load_encoder_init(wider, str(source_run))
    assert "fresh decoder: the source's decoder has other shapes" in caplog.text
    with pytest.raises(CheckpointError, match="holds no full FCMAE model"):
        export(timm_file, "fcmae", out=tmp_path / "x.safetensors", log=lambda _: None)

"""fcmae-export --format hf: a transformers folder that ConvNextV2Model / ConvNextV2ForImageClassification
load, checked here against our sparse encoder independently of the export's own check, from every
input layout fcmae-export reads; the check can fail; without transformers, a clear error."""
import json
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="--format hf needs pip install 'fcmae[hf]' (CI installs it)")

from fcmae import create_fcmae  # noqa: E402
from fcmae.export.convert import to_canonical  # noqa: E402
from fcmae.export.exporter import export  # noqa: E402
from fcmae.export.exporter import main as export_main  # noqa: E402
from fcmae.storage.weights_file import CheckpointError, save_state_dict  # noqa: E402

from conftest import rel_err  # noqa: E402


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """An atto FCMAE with non-trivial weights (GRN included) saved as our training checkpoint."""
    torch.manual_seed(0)
    model = create_fcmae("convnextv2_atto")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "grn" in name or name.endswith("bias"):
                p.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("ck") / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "step": 1, "config": {"data": {"img_size": 192,
                "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}}, path)
    return model, path


def ours_unmasked(model, imgs):
    with torch.no_grad():
        return model.encoder(imgs, torch.zeros(imgs.shape[0], (imgs.shape[-1] // 32) ** 2))


def test_hf_export_loads_in_transformers_and_equals_our_encoder(pretrained, tmp_path):
    model, path = pretrained
    out = export(path, "hf", tmp_path / "atto-hf", log=lambda *_: None)
    hf = transformers.ConvNextV2Model.from_pretrained(str(out)).eval()
    imgs = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hidden = hf(pixel_values=imgs).last_hidden_state
    assert rel_err(hidden, ours_unmasked(model, imgs)) < 1e-5
    config = json.loads((out / "config.json").read_text())
    assert config["depths"] == [2, 2, 6, 2] and config["hidden_sizes"] == [40, 80, 160, 320]
    clf = transformers.ConvNextV2ForImageClassification.from_pretrained(str(out), num_labels=5)
    assert clf.classifier.out_features == 5
    torch.testing.assert_close(clf.convnextv2.encoder.stages[1].layers[0].grn.weight,
                               hf.encoder.stages[1].layers[0].grn.weight)
    processor = transformers.AutoImageProcessor.from_pretrained(str(out))
    assert processor.size["shortest_edge"] == 192 and list(processor.image_mean) == [0.5, 0.5, 0.5]


def test_hf_export_from_every_layout(pretrained, tmp_path):
    model, path = pretrained
    imgs = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    ref = ours_unmasked(model, imgs)
    timm_file = export(path, "timm", tmp_path / "atto_timm.safetensors", log=lambda *_: None)
    official = tmp_path / "official.pth"
    canonical, _ = to_canonical({"model": model.state_dict()})
    save_state_dict(canonical, official)
    for name, src in [("run checkpoint", path), ("timm", timm_file), ("official", official)]:
        out = export(src, "hf", tmp_path / f"hf-{name.replace(' ', '_')}", log=lambda *_: None)
        with torch.no_grad():
            hidden = transformers.ConvNextV2Model.from_pretrained(str(out)).eval()(pixel_values=imgs).last_hidden_state
        assert rel_err(hidden, ref) < 1e-5, name


def test_the_hf_check_can_fail_and_leaves_nothing(pretrained, tmp_path, monkeypatch):
    _, path = pretrained
    import fcmae.export.hf as export_hf
    real = export_hf.canonical_to_hf

    def swapped_grn(canonical, dims):  # a converter bug: GRN gamma and beta exchanged
        sd = real(canonical, dims)
        k = "encoder.stages.0.layers.0.grn."
        sd[k + "weight"], sd[k + "bias"] = sd[k + "bias"], sd[k + "weight"]
        return sd

    monkeypatch.setattr(export_hf, "canonical_to_hf", swapped_grn)
    with pytest.raises(CheckpointError, match="verification FAILED"):
        export(path, "hf", tmp_path / "bad-hf", log=lambda *_: None)
    assert not (tmp_path / "bad-hf").exists() and not list(tmp_path.glob(".bad-hf*"))


def test_hf_export_refuses_to_overwrite_a_foreign_folder_and_names_the_extra(pretrained, tmp_path, monkeypatch,
                                                                            capsys):
    _, path = pretrained
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert export_main([str(path), "--format", "hf", "--out", str(tmp_path / "mine")]) == 2
    assert "not an earlier --format hf export" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    assert export_main([str(path), "--format", "hf", "--out", str(tmp_path / "x-hf")]) == 2
    assert "pip install 'fcmae[hf]'" in capsys.readouterr().err


def test_the_documented_transformers_snippet_runs(pretrained, tmp_path, monkeypatch):
    from pathlib import Path
    page = (Path(__file__).resolve().parents[2] / "docs" / "export_and_finetune.md").read_text()
    snippet = next(block.split("```", 1)[0] for block in page.split("```python\n")[1:]
                   if "ConvNextV2ForImageClassification" in block)
    _, path = pretrained
    export(path, "hf", tmp_path / "atto-hf", log=lambda *_: None)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(snippet, "export_and_finetune.md", "exec"), scope)
    assert torch.isfinite(scope["loss"]) and scope["model"].classifier.out_features == 8

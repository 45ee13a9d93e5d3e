"""The converter: MinkowskiEngine kernel layout, timm/official outputs, bad input, the CLI."""
import pytest
import torch

from fcmae import ConvNeXtV2, create_fcmae
from fcmae.export.convert import (dense_conv_to_me, dense_depthwise_to_me, detect_layout, me_conv_to_dense,
                                  me_depthwise_to_dense, to_canonical, to_dense)
from fcmae.export.exporter import export, main
from fcmae.storage.weights_file import CheckpointError, load_state_dict_file, save_state_dict

from conftest import canonical_to_minkowski, rel_err

timm = pytest.importorskip("timm")


def _encoder_sd(model):
    return {k.removeprefix("encoder."): v for k, v in model.state_dict().items() if k.startswith("encoder.")}


def test_me_depthwise_kernel_first_axis_fastest_hand_example():
    # Offset 1 is one step along the FIRST spatial axis (rows, H): dense (ky=1, kx=0).
    kernel = torch.zeros(49, 2)
    kernel[1, 0] = 1.0
    kernel[7, 1] = 2.0  # offset 7: one step along the second axis (columns, W)
    w = me_depthwise_to_dense(kernel)
    assert w.shape == (2, 1, 7, 7)
    expected = torch.zeros(2, 1, 7, 7)
    expected[0, 0, 1, 0] = 1.0
    expected[1, 0, 0, 1] = 2.0
    assert torch.equal(w, expected)


def test_me_conv_kernel_hand_example():
    kernel = torch.zeros(4, 3, 5)  # (K*K, C_in, C_out)
    kernel[1, 2, 4] = 1.0  # offset 1 -> (ky=1, kx=0)
    kernel[2, 0, 3] = 3.0  # offset 2 -> (ky=0, kx=1)
    w = me_conv_to_dense(kernel)
    assert w.shape == (5, 3, 2, 2)
    assert w[4, 2, 1, 0] == 1.0 and w[3, 0, 0, 1] == 3.0 and w.abs().sum() == 4.0


def test_me_kernel_mappings_invert():
    w = torch.randn(8, 1, 7, 7)
    assert torch.equal(me_depthwise_to_dense(dense_depthwise_to_me(w)), w)
    c = torch.randn(6, 4, 2, 2)
    assert torch.equal(me_conv_to_dense(dense_conv_to_me(c)), c)


def test_minkowski_layout_round_trip_is_exact():
    model = create_fcmae("convnextv2_atto")
    full = model.state_dict()
    me = canonical_to_minkowski(_encoder_sd(model))
    assert me["encoder.stages.0.0.dwconv.kernel"].shape == (49, 40)
    assert me["encoder.stages.0.0.dwconv.bias"].shape == (1, 40)
    assert me["encoder.downsample_layers.1.1.kernel"].shape == (4, 40, 80)
    assert me["encoder.downsample_layers.1.1.bias"].shape == (1, 80)
    assert me["encoder.stages.0.0.grn.gamma"].shape == (1, 160)
    assert "encoder.stages.0.0.norm.ln.weight" in me and "encoder.stages.0.0.pwconv1.linear.weight" in me
    # an official sparse FCMAE checkpoint also carries the decoder: it must be dropped
    me.update({k: v for k, v in full.items() if not k.startswith("encoder.")})
    assert detect_layout(me) == "minkowski"
    back = to_dense({"model": me}, "official")
    assert back.keys() == _encoder_sd(model).keys()
    for k, v in _encoder_sd(model).items():
        assert torch.equal(back[k], v), k


def test_timm_and_official_inputs_round_trip():
    model = create_fcmae("convnextv2_femto")
    canonical = _encoder_sd(model)
    timm_sd = to_dense(model.state_dict(), "timm")
    assert detect_layout(timm_sd) == "timm"
    back, layout = to_canonical(timm_sd)
    assert layout == "timm"
    assert all(torch.equal(back[k], v) for k, v in canonical.items())
    # released *_fcmae.pt style: dense, no decoder, GRN as (1, 4C), nested under "model"
    official = {k: (v.reshape(1, -1) if "grn" in k else v) for k, v in canonical.items()}
    back, layout = to_canonical({"model": official})
    assert layout == "official" and all(torch.equal(back[k], v) for k, v in canonical.items())


def test_export_safetensors_loads_into_timm_strict(tmp_path):
    model = create_fcmae("convnextv2_atto")
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "step": 3}, ckpt)
    out = export(tmp_path / "run", "timm", tmp_path / "atto.safetensors", log=lambda *_: None)
    from safetensors.torch import load_file
    ref = timm.create_model("convnextv2_atto", pretrained=False, num_classes=0).eval()
    ref.load_state_dict(load_file(str(out)), strict=True)
    imgs = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(ref.forward_features(imgs), model.encoder.forward_unmasked(imgs)) < 1e-5


def test_export_official_pth_loads_into_dense_convnextv2(tmp_path):
    model = create_fcmae("convnextv2_atto")
    me = canonical_to_minkowski(_encoder_sd(model))
    torch.save({"model": me}, tmp_path / "official_sparse.pth")
    out = export(tmp_path / "official_sparse.pth", "official", tmp_path / "dense.pth", log=lambda *_: None)
    dense = ConvNeXtV2(model.encoder.depths, model.encoder.dims, num_classes=0)
    missing, unexpected = dense.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert not unexpected and set(missing) == {"norm.weight", "norm.bias"}
    imgs = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        assert rel_err(dense.forward_features(imgs), model.encoder.forward_unmasked(imgs)) < 1e-5


def test_cli_prints_and_verifies(tmp_path, capsys):
    torch.save(create_fcmae("convnextv2_atto").state_dict(), tmp_path / "ck.pt")
    assert main([str(tmp_path / "ck.pt"), "--format", "official", "--out", str(tmp_path / "o.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "verified" in out and "convnextv2_atto" in out


def test_bad_inputs_get_clear_errors(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    assert main([str(junk)]) == 2
    assert "not a loadable PyTorch checkpoint" in capsys.readouterr().err

    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        to_dense(torch.load(tmp_path / "other.pt"), "official")

    sd = create_fcmae("convnextv2_atto").state_dict()
    sd["encoder.stages.2.3.pwconv1.weight"] = torch.zeros(640, 99)
    with pytest.raises(CheckpointError, match=r"stages\.2\.3\.pwconv1\.weight.*\(640, 160\)"):
        to_dense(sd, "timm")

    del sd["encoder.stages.2.3.pwconv1.weight"]
    with pytest.raises(CheckpointError, match=r"missing key 'stages\.2\.3\.pwconv1\.weight'"):
        to_dense(sd, "official")

    with pytest.raises(CheckpointError, match="no such file"):
        export(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="must end in"):
        save_state_dict({}, tmp_path / "x.bin")


def test_export_verification_catches_a_wrong_file(tmp_path, monkeypatch):
    """The self-check must fail when the written weights differ from the source."""
    import fcmae.export.convert as cv
    model = create_fcmae("convnextv2_atto")
    torch.save(model.state_dict(), tmp_path / "ck.pt")
    real = cv.canonical_to_timm

    def corrupt(sd, conv_mlp):
        out = real(sd, conv_mlp)
        out["stages.1.blocks.0.conv_dw.weight"] = out["stages.1.blocks.0.conv_dw.weight"].flip(-1)
        return out
    monkeypatch.setattr(cv, "canonical_to_timm", corrupt)
    with pytest.raises(CheckpointError, match="verification FAILED"):
        export(tmp_path / "ck.pt", "timm", tmp_path / "bad.safetensors", log=lambda *_: None)


def test_from_official_accepts_both_official_layouts_and_refuses_others(tmp_path, capsys):
    model = create_fcmae("convnextv2_atto")
    canonical = _encoder_sd(model)
    sparse = {"model": {**canonical_to_minkowski(canonical), "mask_token": model.mask_token.detach()}}
    torch.save(sparse, tmp_path / "official_sparse.pt")
    torch.save({"model": to_dense(model.state_dict(), "official")}, tmp_path / "official_dense.pt")
    for name in ("official_sparse", "official_dense"):
        out = tmp_path / f"{name}_timm.safetensors"
        assert main(["--from-official", str(tmp_path / f"{name}.pt"), "--format", "timm", "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert "verified" in printed and ("minkowski" in printed or "official" in printed)
        dense = timm.create_model("convnextv2_atto", num_classes=0)
        dense.load_state_dict({k: v for k, v in load_state_dict_file(out).items() if not k.startswith("head.fc")},
                              strict=False)
        imgs = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            assert rel_err(dense.forward_features(imgs), model.encoder.forward_unmasked(imgs)) < 1e-5

    timm_file = tmp_path / "official_dense_timm.safetensors"
    assert main(["--from-official", str(timm_file), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "timm layout, not an official" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([])  # neither a checkpoint nor --from-official


def test_export_out_may_name_a_folder_and_a_wrong_suffix_is_one_line(tmp_path, capsys):
    """#40 (small items): `--out DIR` ended in a ValueError traceback; a folder now takes the default
    file name inside it, and a name without a weights suffix is refused with the fix, before any work."""
    ck = tmp_path / "ck.pt"
    torch.save({"model": create_fcmae("convnextv2_atto").state_dict()}, ck)
    folder = tmp_path / "exports"
    folder.mkdir()
    assert main([str(ck), "--format", "timm", "--out", str(folder), "--no-verify"]) == 0
    written = folder / "ck_timm.safetensors"
    assert written.is_file() and "stem.0.weight" in load_state_dict_file(written)
    assert main([str(ck), "--format", "timm", "--out", str(tmp_path / "atto.bin")]) == 2
    err = capsys.readouterr().err
    assert "ends in .safetensors, .pth or .pt" in err and "Traceback" not in err
    assert not (tmp_path / "atto.bin").exists()

"""Loss conventions, mask drawing and input checks, against hand computations."""
import pytest
import torch

from fcmae import create_fcmae
from fcmae.models.loss import masked_mse_loss, patchify, pixel_targets, unpatchify
from fcmae.models.masking import random_mask


def test_patchify_order_is_nhwpqc():
    imgs = torch.randn(2, 3, 64, 96)
    patches = patchify(imgs)
    assert patches.shape == (2, 6, 32 * 32 * 3)
    # patch (row 1, col 2) -> index 1*3+2; pixel (p=5, q=7, c=2) -> (5*32+7)*3+2
    assert patches[1, 5, (5 * 32 + 7) * 3 + 2] == imgs[1, 2, 32 + 5, 64 + 7]
    assert torch.equal(unpatchify(patches, (2, 3)), imgs)


def test_norm_pix_target_hand_computed():
    imgs = torch.randn(1, 3, 32, 32)
    target = pixel_targets(imgs, norm_pix=True)[0, 0]
    flat = imgs[0].permute(1, 2, 0).reshape(-1)  # (p, q, c) order
    mean = flat.sum() / flat.numel()
    var = ((flat - mean) ** 2).sum() / (flat.numel() - 1)  # unbiased, as the official code
    assert torch.allclose(target, (flat - mean) / torch.sqrt(var + 1e-6), atol=1e-5)


def test_loss_only_counts_masked_patches():
    imgs = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    pred = torch.randn(2, 3072, 2, 2)
    base = masked_mse_loss(pred, imgs, mask)
    changed = pred.clone()
    changed[0, :, 0, 1] += 10  # visible patch 1 of sample 0
    changed[1, :, 1, 1] -= 10  # visible patch 3 of sample 1
    assert torch.equal(masked_mse_loss(changed, imgs, mask), base)
    changed[0, :, 1, 1] += 1  # masked patch 3 of sample 0
    assert masked_mse_loss(changed, imgs, mask) != base
    # hand value: mean over the 3 masked patches of the per-patch pixel MSE
    t = pixel_targets(imgs)
    p = pred.reshape(2, 3072, 4).transpose(1, 2)
    per = ((p - t) ** 2).mean(-1)
    assert torch.allclose(base, (per[0, 0] + per[0, 3] + per[1, 1]) / 3)


def test_random_mask_exact_visible_count():
    mask = random_mask(5, 49, 0.6)
    assert mask.shape == (5, 49)
    assert torch.all((mask == 0).sum(1) == 19)  # int(49 * 0.4) = 19, as the official code
    assert not torch.equal(mask[0], mask[1])  # drawn per sample


def test_model_outputs_and_conventions():
    model = create_fcmae("convnextv2_atto", decoder_embed_dim=64)
    loss, pred, mask = model(torch.randn(2, 3, 64, 96), mask_ratio=0.5)
    assert pred.shape == (2, 3072, 2, 3) and mask.shape == (2, 6) and loss.ndim == 0
    assert torch.all((mask == 0).sum(1) == 3)


@pytest.mark.parametrize("size", [(64, 65), (100, 64), (16, 32)])
def test_bad_image_size_is_a_value_error_naming_it(size):
    model = create_fcmae("convnextv2_atto")
    with pytest.raises(ValueError, match=f"{size[0]}x{size[1]}"):
        model(torch.randn(1, 3, *size))


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_bad_mask_ratio(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        create_fcmae("convnextv2_atto")(torch.randn(1, 3, 64, 64), mask_ratio=ratio)
    with pytest.raises(ValueError, match="mask_ratio"):
        create_fcmae("convnextv2_atto", mask_ratio=ratio)


def test_mask_errors():
    model = create_fcmae("convnextv2_atto")
    imgs = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match=r"samples \[1\] have no visible patch"):
        model(imgs, mask=torch.tensor([[0.0, 1, 1, 1], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match=r"expected \(2, 4\)"):
        model(imgs, mask=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="no visible patch"):
        model(torch.randn(1, 3, 32, 32), mask_ratio=0.5)  # int(1 * 0.5) = 0 visible


def test_state_dict_names_shapes_and_init():
    model = create_fcmae("convnextv2_atto")
    sd = model.state_dict()
    expect = {
        "encoder.downsample_layers.0.0.weight": (40, 3, 4, 4),
        "encoder.downsample_layers.0.1.weight": (40,),
        "encoder.downsample_layers.1.0.weight": (40,),
        "encoder.downsample_layers.1.1.weight": (80, 40, 2, 2),
        "encoder.stages.0.0.dwconv.weight": (40, 1, 7, 7),
        "encoder.stages.0.0.norm.weight": (40,),
        "encoder.stages.0.0.pwconv1.weight": (160, 40),
        "encoder.stages.0.0.grn.gamma": (1, 1, 1, 160),
        "encoder.stages.0.0.grn.beta": (1, 1, 1, 160),
        "encoder.stages.3.1.pwconv2.weight": (320, 1280),
        "proj.weight": (512, 320, 1, 1),
        "mask_token": (1, 512, 1, 1),
        "decoder.0.dwconv.weight": (512, 1, 7, 7),
        "decoder.0.grn.gamma": (1, 1, 1, 2048),
        "pred.weight": (3072, 512, 1, 1),
    }
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any(k.startswith(("encoder.norm", "encoder.head")) for k in sd)
    # std 0.02 init (not the official encoder's accidental std 1.0)
    w = sd["encoder.stages.2.0.pwconv1.weight"]
    assert 0.018 < w.std() < 0.022 and w.abs().max() < 0.15
    assert 0.01 < sd["mask_token"].std() < 0.03
    assert torch.all(sd["encoder.stages.0.0.pwconv1.bias"] == 0)
    assert torch.all(sd["encoder.stages.0.0.grn.gamma"] == 0)
    assert torch.all(sd["encoder.stages.0.0.norm.weight"] == 1)


@pytest.mark.parametrize("name", ["atto", "femto", "pico", "nano", "tiny", "base", "large", "huge"])
def test_every_size_matches_timm_parameter_count(name):
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        ours = create_fcmae(f"convnextv2_{name}").encoder
        ref = timm.create_model(f"convnextv2_{name}", pretrained=False, num_classes=0)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_ref = sum(p.numel() for n, p in ref.named_parameters() if not n.startswith("head."))
    assert n_ours == n_ref


def test_unknown_model_and_backend():
    with pytest.raises(ValueError, match="convnextv2_atto"):
        create_fcmae("convnextv2_giant")
    with pytest.raises(ValueError, match="backend"):
        create_fcmae("convnextv2_atto", backend="cuda-magic")
    with pytest.raises(ValueError, match="grn_stats"):
        create_fcmae("convnextv2_atto", grn_stats="global")

"""``model.patch_size`` (#50): 16- and 8-pixel mask patches by a stem of stride 2 or 1 (the encoder's total
stride is the patch, so every stage still holds 8x8, 4x4, 2x2, 1x1 sites a patch). The sparse encoder
against the masked-dense backend and against timm's dense ConvNeXt V2 with ``patch_size=`` (its stem), no
masked pixel reaching a visible output, the decoder's and the loss's shapes, and a clear refusal of a patch
the encoder cannot have."""
import pytest
import torch

from fcmae.models.convnextv2 import ConvNeXtV2
from fcmae.models.fcmae import create_fcmae
from fcmae.models.loss import patchify
from fcmae.models.masking import stem_stride

from conftest import rel_err

SHAPES = [(16, 112, 112), (8, 56, 56), (16, 64, 96), (32, 64, 64)]  # (patch, H, W)


def _mask(n, grid, seed):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(n, grid[0] * grid[1], generator=g) < 0.6).float()
    mask[:, 0] = 0  # every sample keeps a patch
    return mask


@pytest.mark.parametrize("patch,h,w", SHAPES, ids=lambda v: str(v))
def test_the_sparse_encoder_equals_the_masked_dense_backend_at_every_patch_size(patch, h, w):
    torch.manual_seed(0)
    sparse = create_fcmae("convnextv2_atto", patch_size=patch, backend="sparse", decoder_embed_dim=32)
    dense = create_fcmae("convnextv2_atto", patch_size=patch, backend="dense", decoder_embed_dim=32)
    dense.load_state_dict(sparse.state_dict())
    imgs = torch.randn(2, 3, h, w)
    mask = _mask(2, (h // patch, w // patch), seed=patch)
    (ls, ps, _), (ld, pd, _) = sparse(imgs, mask), dense(imgs, mask)
    assert ps.shape == (2, patch * patch * 3, h // patch, w // patch)  # patch^2 x bands a site
    assert rel_err(ps, pd) < 1e-5 and abs(ls.item() - ld.item()) < 1e-5 * abs(ld.item())
    gs = torch.autograd.grad(ls, list(sparse.parameters()), allow_unused=True)
    gd = torch.autograd.grad(ld, list(dense.parameters()), allow_unused=True)
    worst = max(rel_err(a, b) for a, b in zip(gs, gd) if a is not None and b.norm() > 0)
    assert worst < 1e-4, worst


@pytest.mark.parametrize("patch,h,w", SHAPES, ids=lambda v: str(v))
def test_no_masked_pixel_reaches_a_visible_site(patch, h, w):
    """Every pixel of every masked patch replaced by noise: the encoder's output at the visible sites and
    the prediction of the masked patches (which only the visible ones may feed) do not move."""
    torch.manual_seed(1)
    model = create_fcmae("convnextv2_atto", patch_size=patch, decoder_embed_dim=32).eval()
    imgs = torch.randn(2, 3, h, w)
    mask = _mask(2, (h // patch, w // patch), seed=3)
    pixel_mask = mask.view(2, 1, h // patch, w // patch).repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    other = imgs * (1 - pixel_mask) + 100 * torch.randn_like(imgs) * pixel_mask
    with torch.no_grad():
        a, b = model.forward_encoder(imgs, mask), model.forward_encoder(other, mask)
        pa, pb = model.forward_decoder(a, mask), model.forward_decoder(b, mask)
    assert torch.equal(a, b) and torch.equal(pa, pb)
    assert (a.abs().sum(1).flatten(1) > 0).float().sum() == (mask == 0).sum()  # the visible sites are there


@pytest.mark.parametrize("patch", [16, 8])
def test_unmasked_the_sparse_encoder_equals_timm_with_the_same_stem(patch):
    """The independent reference: timm's dense ``convnextv2_atto(patch_size=stem)`` on the same weights (at
    stem 2 without the stage-0 downsample timm adds after such a stem: :func:`timm_convnextv2`)."""
    pytest.importorskip("timm")
    from fcmae.export.convert import canonical_to_format
    from fcmae.models.timm_convnextv2 import timm_convnextv2
    torch.manual_seed(2)
    model = create_fcmae("convnextv2_atto", patch_size=patch).eval()
    canonical = {k.removeprefix("encoder."): v for k, v in model.state_dict().items() if k.startswith("encoder.")}
    ref = timm_convnextv2("convnextv2_atto", patch // 8, num_classes=0).eval()
    ref.load_state_dict(canonical_to_format(canonical, "timm"), strict=True)
    imgs = torch.randn(2, 3, 7 * patch, 5 * patch)
    with torch.no_grad():
        ours = model.forward_encoder(imgs, torch.zeros(2, 35))
        theirs = ref.forward_features(imgs)
        dense = ConvNeXtV2((2, 2, 6, 2), (40, 80, 160, 320), num_classes=0, stem_stride=patch // 8)
        dense.load_state_dict(canonical, strict=False)
        ours_dense = dense.eval().forward_features(imgs)
    assert ours.shape == theirs.shape == (2, 320, 7, 5)
    assert rel_err(ours, theirs) < 1e-5 and rel_err(ours_dense, theirs) < 1e-5


def test_the_loss_reads_patches_of_the_model_s_size():
    """The pixel targets are the image cut into the model's patches: a 112-px image in 16-px patches is 49
    rows of 16 * 16 * 3 values, each row one patch's pixels (checked by hand at one patch)."""
    imgs = torch.arange(2 * 3 * 112 * 112, dtype=torch.float32).view(2, 3, 112, 112)
    rows = patchify(imgs, 16)
    assert rows.shape == (2, 49, 16 * 16 * 3)
    i, j = 2, 5  # the patch at row 2, column 5
    hand = imgs[1, :, 16 * i:16 * i + 16, 16 * j:16 * j + 16].permute(1, 2, 0).reshape(-1)
    assert torch.equal(rows[1, 7 * i + j], hand)


@pytest.mark.parametrize("bad", [12, 0, -8, 20])
def test_a_patch_the_encoder_cannot_have_is_refused_with_the_sizes_that_work(bad):
    with pytest.raises(ValueError, match=r"multiple of 8.*32, 16 or 8"):
        stem_stride(bad)
    with pytest.raises(ValueError, match="model.patch_size"):
        create_fcmae("convnextv2_atto", patch_size=bad)


def test_an_image_that_is_no_multiple_of_the_patch_is_refused_early():
    model = create_fcmae("convnextv2_atto", patch_size=16, decoder_embed_dim=32)
    with pytest.raises(ValueError, match=r"120x112 .* multiples of 16"):
        model(torch.randn(1, 3, 120, 112))

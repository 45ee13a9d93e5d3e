"""The sparse backend against independent references: timm's dense ConvNeXt V2,
the masked-dense backend, and brute-force loops."""
import copy

import pytest
import torch

from fcmae import create_fcmae
from fcmae.export import to_dense
from fcmae.models.masking import random_mask
from fcmae.sparse.compact import gather_from_canvas, grn_rows, scatter_to_canvas
from fcmae.sparse.layout import SparseLayout
from fcmae.sparse.masked_dense import grn_masked

from conftest import rel_err

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("name,size", [("atto", (64, 64)), ("femto", (96, 64)), ("tiny", (64, 96))])
def test_unmasked_sparse_encoder_equals_timm(name, size):
    model = create_fcmae(f"convnextv2_{name}").eval()
    ref = timm.create_model(f"convnextv2_{name}", pretrained=False, num_classes=0).eval()
    ref.load_state_dict(to_dense(model.state_dict(), "timm"), strict=True)
    imgs = torch.randn(2, 3, *size)
    grid = (size[0] // 32) * (size[1] // 32)
    with torch.no_grad():
        ours = model.forward_encoder(imgs, torch.zeros(2, grid))
        theirs = ref.forward_features(imgs)
    assert ours.shape == theirs.shape
    assert rel_err(ours, theirs) < 1e-5


def _pair(grn_stats="sample", drop_path_rate=0.0, name="convnextv2_atto"):
    sparse = create_fcmae(name, backend="sparse", grn_stats=grn_stats, drop_path_rate=drop_path_rate)
    dense = create_fcmae(name, backend="dense", grn_stats=grn_stats, drop_path_rate=drop_path_rate)
    dense.load_state_dict(sparse.state_dict())
    # GRN gamma/beta start at zero, which would hide GRN bugs: give them values.
    with torch.no_grad():
        for m in (sparse, dense):
            for n, p in m.named_parameters():
                if "grn" in n:
                    p.copy_(torch.linspace(-0.5, 0.5, p.numel()).view_as(p))
    return sparse, dense


def _compare(sparse, dense, imgs, mask, visible=None):
    outs = []
    for model in (sparse, dense):
        model.zero_grad()
        torch.manual_seed(123)  # same drop-path draws for both
        feats = model.forward_encoder(imgs, mask, visible)
        pred = model.forward_decoder(feats, mask)
        loss = model.forward_loss(imgs, pred, mask)
        probe = (feats * torch.linspace(-1, 1, feats.numel()).view_as(feats)).sum()
        (loss + probe).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        outs.append((feats, loss, grads))
    (fs, ls, gs), (fd, ld, gd) = outs
    assert rel_err(fs, fd) < 1e-5
    assert abs(ls.item() - ld.item()) <= 1e-5 * max(1.0, abs(ld.item()))
    assert gs.keys() == gd.keys() and len(gs) == len(list(sparse.parameters()))
    for n in gs:
        assert rel_err(gs[n], gd[n]) < 1e-5, n


@pytest.mark.parametrize("ratio", [0.0, 0.6, 0.8])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("grn_stats", ["sample", "batch"])
def test_sparse_equals_masked_dense(ratio, batch, grn_stats):
    sparse, dense = _pair(grn_stats)
    imgs = torch.randn(batch, 3, 64, 96)  # non-square: 2x3 patch grid
    mask = random_mask(batch, 6, ratio)
    visible = int(6 * (1 - ratio))
    _compare(sparse, dense, imgs, mask, visible)
    _compare(sparse, dense, imgs, mask, None)  # same mask through the general (nonzero) path


def test_sparse_equals_masked_dense_variable_visible_counts_and_drop_path():
    sparse, dense = _pair("sample", drop_path_rate=0.5)
    sparse.train(), dense.train()
    imgs = torch.randn(3, 3, 96, 128)  # 3x4 grid
    mask = torch.ones(3, 12)
    mask[0, [0, 5, 11]] = 0
    mask[1, :] = 0          # everything visible
    mask[2, [7]] = 0        # a single visible patch
    _compare(sparse, dense, imgs, mask)


def test_full_forward_random_mask_matches_between_backends():
    sparse, dense = _pair()
    imgs = torch.randn(2, 3, 64, 64)
    torch.manual_seed(5)
    ls, ps, ms = sparse(imgs, mask_ratio=0.5)
    torch.manual_seed(5)
    ld, pd, md = dense(imgs, mask_ratio=0.5)
    assert torch.equal(ms, md)
    assert rel_err(ps, pd) < 1e-5 and abs(ls.item() - ld.item()) < 1e-5


def test_depthwise_conv_brute_force_submanifold():
    """One block's depthwise conv on active rows equals a naive loop over active sites
    in which inactive neighbours count as zero; outputs exist only at active sites."""
    model = create_fcmae("convnextv2_atto")
    block = model.encoder.stages[0][0]
    n, c = 2, block.dwconv.in_channels
    mask = torch.tensor([[0.0, 1, 1, 0], [1, 1, 0, 1]])  # 2x2 grid of 64x64 images
    layout = SparseLayout.from_mask(mask, (2, 2))
    sites = layout.stages[0]  # 16x16 stage
    rows = torch.randn(sites.num_rows, c)
    with torch.no_grad():
        out = gather_from_canvas(block.dwconv(scatter_to_canvas(rows, sites, n)), sites)
    assert out.shape == (3 * 64, c)  # 3 visible patches of 8x8 sites

    h, w = sites.size
    where = {int(i): r for r, i in enumerate(sites.canvas_index)}
    weight, bias = block.dwconv.weight.detach(), block.dwconv.bias.detach()
    expected = torch.zeros_like(out)
    for r, flat in enumerate(sites.canvas_index.tolist()):
        s, rem = divmod(flat, h * w)
        y, x = divmod(rem, w)
        acc = bias.clone()
        for ky in range(7):
            for kx in range(7):
                yy, xx = y + ky - 3, x + kx - 3
                if 0 <= yy < h and 0 <= xx < w:
                    nb = where.get((s * h + yy) * w + xx)
                    if nb is not None:  # inactive neighbours contribute zero
                        acc = acc + weight[:, 0, ky, kx] * rows[nb]
        expected[r] = acc
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_layout_rows_are_hierarchical():
    """The four children of every coarse site are consecutive rows in (dy, dx) order."""
    mask = torch.tensor([[1.0, 0, 0, 1, 0, 1]])
    layout = SparseLayout.from_mask(mask, (2, 3))
    for k in range(3):
        fine, coarse = layout.stages[k], layout.stages[k + 1]
        fy, fx = (fine.canvas_index // fine.size[1]), fine.canvas_index % fine.size[1]
        cy, cx = coarse.canvas_index // coarse.size[1], coarse.canvas_index % coarse.size[1]
        assert torch.equal(fy.view(-1, 4) // 2, cy[:, None].expand(-1, 4))
        assert torch.equal(fx.view(-1, 4) // 2, cx[:, None].expand(-1, 4))
        assert torch.equal(fy.view(-1, 4) % 2, torch.tensor([0, 0, 1, 1]).expand(len(cy), 4))
        assert torch.equal(fx.view(-1, 4) % 2, torch.tensor([0, 1, 0, 1]).expand(len(cy), 4))


def _grn_module():
    grn = copy.deepcopy(create_fcmae("convnextv2_atto").encoder.stages[0][0].grn)
    with torch.no_grad():
        grn.gamma.copy_(torch.randn_like(grn.gamma))
        grn.beta.copy_(torch.randn_like(grn.beta))
    return grn


@pytest.mark.parametrize("uniform", [True, False])
def test_grn_stats_against_hand_references(uniform):
    grn = _grn_module()
    mask = torch.tensor([[0.0, 1, 0, 1], [1, 0, 0, 0]]) if not uniform else torch.tensor([[0.0, 1, 0, 1], [1, 0, 0, 1]])
    layout = SparseLayout.from_mask(mask, (2, 2), visible_per_sample=2 if uniform else None)
    x = torch.randn(layout.stages[3].num_rows, 160)
    gamma, beta, eps = grn.gamma.view(-1), grn.beta.view(-1), 1e-6

    # batch: one pooled norm over all active rows of the batch (official MinkowskiGRN)
    gx = (x ** 2).sum(0).sqrt()
    ref_batch = gamma * (x * (gx / (gx.mean() + eps))) + beta + x
    assert torch.allclose(grn_rows(grn, x, layout, 3, "batch"), ref_batch, atol=1e-6)

    # sample: each sample's own norm, by an explicit loop over samples
    ref_sample = torch.empty_like(x)
    sample = layout.stages[3].sample_index
    for s in range(2):
        rows = sample == s
        g = (x[rows] ** 2).sum(0).sqrt()
        ref_sample[rows] = gamma * (x[rows] * (g / (g.mean() + eps))) + beta + x[rows]
    assert torch.allclose(grn_rows(grn, x, layout, 3, "sample"), ref_sample, atol=1e-6)

    # the masked-dense backend computes the same on a zero-filled canvas
    canvas = scatter_to_canvas(x, layout.stages[3], 2).permute(0, 2, 3, 1)
    for stats, ref in (("batch", ref_batch), ("sample", ref_sample)):
        dense = grn_masked(grn, canvas, stats).permute(0, 3, 1, 2)
        assert torch.allclose(gather_from_canvas(dense, layout.stages[3]), ref, atol=1e-6)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_halo_table_lists_the_rows_a_7x7_conv_reads(stage):
    """Brute force against the canvas: every entry of a tile's halo table (#38) is the row at that
    site of the image, -1 where the site is masked or off the image."""
    g = torch.Generator().manual_seed(stage)
    mask = (torch.rand(2, 12, generator=g) < 0.5).long()
    mask[:, 0] = 0
    layout = SparseLayout.from_mask(mask, (3, 4))
    sites, tiles = layout.stages[stage], layout.tiles(stage)
    h, w = sites.size
    rows_at = torch.full((2 * h * w,), -1, dtype=torch.long)
    rows_at[sites.canvas_index] = torch.arange(sites.num_rows)
    rows_at = rows_at.view(2, h, w)
    t, side = tiles.tile, tiles.tile + 6
    assert tiles.halo.shape == (tiles.num_tiles, side * side) and tiles.halo.dtype == torch.int32
    for p in range(tiles.num_tiles):
        corner = int(sites.canvas_index[p * t * t])  # the tile's first row is its top-left site
        n, y0, x0 = corner // (h * w), corner % (h * w) // w, corner % w
        for hy in range(side):
            for hx in range(side):
                y, x = y0 + hy - 3, x0 + hx - 3
                want = int(rows_at[n, y, x]) if 0 <= y < h and 0 <= x < w else -1
                assert int(tiles.halo[p, hy * side + hx]) == want, (p, hy, hx)

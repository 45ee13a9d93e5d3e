"""The optional MinkowskiEngine backend against the ``sparse`` and ``dense`` backends.

Without MinkowskiEngine the equivalence tests are SKIPPED with a reason that pytest's
``-ra`` summary prints (and .ci/run prints a banner): never passed silently.
"""
import sys

import pytest
import torch

from fcmae import create_fcmae
from fcmae.models.masking import random_mask

from conftest import rel_err

from fcmae.sparse.me_compat import minkowski_error

ME_ERROR = minkowski_error()

needs_me = pytest.mark.skipif(
    ME_ERROR is not None,
    reason=f"MINKOWSKI EQUIVALENCE NOT TESTED: MinkowskiEngine does not import ({ME_ERROR}); "
           "install it with bash launch/install_minkowski.sh")


def _models(grn_stats, drop_path_rate=0.0):
    torch.manual_seed(0)
    ref = create_fcmae("convnextv2_atto", backend="sparse", grn_stats=grn_stats, drop_path_rate=drop_path_rate,
                       decoder_embed_dim=64)
    with torch.no_grad():  # GRN starts at zero, which would hide GRN bugs
        for n, p in ref.named_parameters():
            if "grn" in n:
                p.copy_(torch.linspace(-0.5, 0.5, p.numel()).view_as(p))
    models = {}
    for backend in ("sparse", "dense", "minkowski"):
        m = create_fcmae("convnextv2_atto", backend=backend, grn_stats=grn_stats, drop_path_rate=drop_path_rate,
                         decoder_embed_dim=64)
        m.load_state_dict(ref.state_dict())  # one state dict for every backend
        models[backend] = m
    return models


def _run(model, imgs, mask, visible):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # same drop-path draws
    feats = model.forward_encoder(imgs, mask, visible)
    loss = model.forward_loss(imgs, model.forward_decoder(feats, mask), mask)
    probe = (feats * torch.linspace(-1, 1, feats.numel()).view_as(feats)).sum()
    (loss + probe).backward()
    return feats.detach(), loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@needs_me
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("grn_stats", ["sample", "batch"])
def test_minkowski_equals_sparse_and_dense(batch, grn_stats):
    models = _models(grn_stats)
    g = torch.Generator().manual_seed(batch)
    imgs = torch.randn(batch, 3, 64, 96, generator=g)  # 2x3 patch grid
    for ratio in (0.5, 0.8):
        mask = random_mask(batch, 6, ratio, generator=g)
        visible = int(6 * (1 - ratio))
        fm, lm, gm = _run(models["minkowski"], imgs, mask, visible)
        for ref in ("sparse", "dense"):
            fr, lr, gr = _run(models[ref], imgs, mask, visible)
            assert rel_err(fm, fr) < 1e-5, ref
            assert abs(lm - lr) <= 1e-5 * max(1.0, abs(lr)), ref
            for n in gr:
                assert rel_err(gm[n], gr[n]) < 1e-5, (ref, n)


@needs_me
def test_minkowski_drop_path_and_uneven_visible_counts():
    models = _models("sample", drop_path_rate=0.5)
    for m in models.values():
        m.train()
    imgs = torch.randn(3, 3, 96, 128)
    mask = torch.ones(3, 12)
    mask[0, [0, 5, 11]] = 0
    mask[1, :] = 0
    mask[2, [7]] = 0
    fm, lm, gm = _run(models["minkowski"], imgs, mask, None)
    fs, ls, gs = _run(models["sparse"], imgs, mask, None)
    assert rel_err(fm, fs) < 1e-5 and abs(lm - ls) < 1e-5
    for n in gs:
        assert rel_err(gm[n], gs[n]) < 1e-5, n


def test_missing_minkowski_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "MinkowskiEngine", None)  # makes `import MinkowskiEngine` fail
    monkeypatch.delitem(sys.modules, "fcmae.sparse.minkowski", raising=False)
    with pytest.raises(ImportError, match=r"launch/install_minkowski\.sh"):
        create_fcmae("convnextv2_atto", backend="minkowski")
    from fcmae.config import ConfigError
    from fcmae.run.validation import validate
    from test_pretrain import make_cfg
    with pytest.raises(ConfigError, match=r"encoder.backend=minkowski.*install_minkowski\.sh"):
        validate(make_cfg("encoder.backend=minkowski"))

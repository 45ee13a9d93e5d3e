"""Reconstruction grids: original / masked / reconstruction, one column per image."""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import save_image

from .storage.files import write_atomic
from .models.loss import patch_stats, patchify, pred_to_patches, unpatchify
from .models.masking import upsample_visible


@torch.no_grad()
def reconstruction_grid(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, norm_pix: bool,
                        mean, std, patch_size: int = 32, max_images: int = 8, bands=None) -> torch.Tensor:
    """``(3 * n, C, H, W)`` images in ``[0, 1]``: originals, masked inputs, reconstructions.

    RGB (3 bands) and greyscale (1 band) show in their own units (the normalisation undone). Other
    band counts show ``bands`` (``vis.bands``: three as red, green, blue, or one as grey; default the
    first three), each stretched by the run's mean and std: mean - 2 std is black, mean + 2 std white.

    With ``norm_pix`` the prediction is in per-patch normalised units; it is
    mapped back with each patch's own mean/std. Visible patches of the
    reconstruction show the input, as in the MAE visualisations.
    """
    n = min(max_images, imgs.shape[0])
    imgs, pred, mask = imgs[:n].float(), pred[:n].float(), mask[:n].float()
    grid = (imgs.shape[-2] // patch_size, imgs.shape[-1] // patch_size)
    target = patchify(imgs, patch_size)
    p = pred_to_patches(pred)
    if norm_pix:
        patch_mean, patch_std = patch_stats(target)
        p = p * patch_std + patch_mean
    m = mask[..., None]
    recon = unpatchify(p * m + target * (1 - m), grid, patch_size, imgs.shape[1])
    masked = unpatchify(target * (1 - m), grid, patch_size, imgs.shape[1])
    c = imgs.shape[1]
    if c in (1, 3) and bands is None:
        mean_t = torch.tensor(mean, device=imgs.device).view(1, -1, 1, 1)
        std_t = torch.tensor(std, device=imgs.device).view(1, -1, 1, 1)

        def show(x):
            return (x * std_t + mean_t).clamp(0, 1)
    else:
        pick = list(bands) if bands is not None else list(range(min(c, 3)))
        pick = pick if len(pick) in (1, 3) else pick[:1]

        def show(x):  # normalised values are in std units: +-2 std spans the range
            return ((x[:, pick] + 2) / 4).clamp(0, 1)
    return torch.cat([show(imgs), show(masked) * upsample_visible(mask, grid, patch_size), show(recon)])


def save_reconstruction_grid(path: str | Path, *args, **kwargs) -> Path:
    """Write the grid as a PNG, whole or not at all (:func:`fcmae.storage.files.write_atomic`)."""
    rows = reconstruction_grid(*args, **kwargs)
    return write_atomic(path, lambda tmp: save_image(rows, tmp, nrow=rows.shape[0] // 3, padding=2, format="png"),
                        "reconstruction image")

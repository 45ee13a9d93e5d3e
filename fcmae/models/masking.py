"""Patch masks on the patch grid: drawing, checking and upsampling.

Convention (the official one): ``mask`` is ``(N, L)`` with 1 = masked (removed)
and 0 = visible, ``L = (H/p) * (W/p)`` in raster order, ``p`` the patch size (32 by default: the
encoder's total stride; 16 or 8 with a stem of stride 2 or 1, :func:`stem_stride`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PATCH_SIZE = 32  # the default: ConvNeXt V2's stem of stride 4 times its three 2x downsamples
ENCODER_STRIDE_AFTER_STEM = 8  # the three downsamples


def stem_stride(patch_size: int) -> int:
    """The stem's stride (and kernel) for a mask patch of ``patch_size`` pixels: the encoder's total stride
    is the patch, so a patch is one site of the last stage and ``8 x 8`` sites of the first at every patch
    size (the sparse layout and the tile kernels do not change; only the stem's cells do). timm and
    transformers call this stride the model's ``patch_size`` (4 by default)."""
    if not isinstance(patch_size, int) or patch_size <= 0 or patch_size % ENCODER_STRIDE_AFTER_STEM:
        raise ValueError(f"model.patch_size={patch_size} is not supported: it must be a positive multiple of "
                         f"{ENCODER_STRIDE_AFTER_STEM} (the encoder downsamples 8x after its stem), e.g. 32, 16 or 8")
    return patch_size // ENCODER_STRIDE_AFTER_STEM


def image_shape(img_size) -> tuple[int, int]:
    """``data.img_size`` as ``(H, W)``: one size (square) or ``[H, W]``; a ValueError naming both forms
    for anything else."""
    if isinstance(img_size, bool):
        raise ValueError(f"data.img_size={img_size!r}: give one size (224) or [height, width] ([224, 160])")
    if isinstance(img_size, int):
        return img_size, img_size
    try:
        values = list(img_size)
    except TypeError:
        values = None
    if not values or len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"data.img_size={img_size!r}: give one size (224) or [height, width] ([224, 160])")
    return int(values[0]), int(values[1])


def check_image_size(height: int, width: int, patch_size: int = PATCH_SIZE) -> tuple[int, int]:
    """Patch-grid size ``(h, w)``; a ValueError when H or W is not a multiple of the patch."""
    if height <= 0 or width <= 0 or height % patch_size or width % patch_size:
        raise ValueError(
            f"image size {height}x{width} is not supported: height and width must be positive "
            f"multiples of {patch_size} (e.g. 224x224, 64x96); resize or crop the input"
        )
    return height // patch_size, width // patch_size


def check_mask_ratio(mask_ratio: float) -> float:
    if not (0.0 <= float(mask_ratio) < 1.0):
        raise ValueError(f"mask_ratio={mask_ratio} is outside [0, 1); use e.g. 0.6")
    return float(mask_ratio)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Visible patches per sample, as the official code computes it."""
    return int(num_patches * (1 - check_mask_ratio(mask_ratio)))


def random_mask(n: int, num_patches: int, mask_ratio: float | None = None, device=None,
                generator: torch.Generator | None = None, keep: int | None = None) -> torch.Tensor:
    """``(n, L)`` float mask, exactly ``int(L * (1 - ratio))`` zeros per row (or ``keep`` zeros).

    Drawn per sample by argsort of Gaussian noise, as the official FCMAE does; the one place
    masks are drawn (the model's own and the data pipeline's, seeded per sample).
    """
    if keep is None:
        keep = num_visible(num_patches, mask_ratio)
    if keep < 1:
        raise ValueError(
            f"mask_ratio={mask_ratio} leaves no visible patch out of {num_patches}; "
            "lower the mask ratio or use larger images"
        )
    noise = torch.randn(n, num_patches, device=device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    mask = torch.ones(n, num_patches, device=device)
    mask.scatter_(1, ids_shuffle[:, :keep], 0.0)
    return mask


def check_mask(mask: torch.Tensor, n: int, grid: tuple[int, int]) -> torch.Tensor:
    """Validate a user mask and return it as float ``(N, L)``.

    Accepts ``(N, L)`` or ``(N, h, w)``; values must be 0/1; every sample needs
    at least one visible (0) patch.
    """
    h, w = grid
    if mask.dim() == 3:
        mask = mask.reshape(mask.shape[0], -1)
    if mask.dim() != 2 or mask.shape != (n, h * w):
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}, expected ({n}, {h * w}) for {n} images "
            f"with a {h}x{w} grid of 32x32 patches (1 = masked, 0 = visible)"
        )
    mask = mask.float()
    if not torch.all((mask == 0) | (mask == 1)):
        raise ValueError("mask values must be 0 (visible) or 1 (masked)")
    empty = (mask.min(dim=1).values > 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"samples {empty} have no visible patch; every sample needs at least one 0 in its mask"
        )
    return mask


def upsample_visible(mask: torch.Tensor, grid: tuple[int, int], scale: int) -> torch.Tensor:
    """Visibility ``(N, 1, h*scale, w*scale)`` (1 = active) of a stage ``scale`` times finer."""
    visible = (1.0 - mask).view(mask.shape[0], 1, *grid)
    if scale == 1:
        return visible
    return F.interpolate(visible, scale_factor=scale, mode="nearest")

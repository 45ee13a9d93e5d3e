"""Pixel targets and the masked reconstruction loss, in the official conventions."""
from __future__ import annotations

import torch


def patchify(imgs: torch.Tensor, patch_size: int = 32) -> torch.Tensor:
    """``(N, C, H, W) -> (N, L, p*p*C)``, official order ``nchpwq -> nhwpqc``."""
    n, c, h, w = imgs.shape
    p = patch_size
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, grid: tuple[int, int], patch_size: int = 32, chans: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(N, L, p*p*C) -> (N, C, h*p, w*p)``."""
    n = x.shape[0]
    h, w = grid
    p = patch_size
    x = x.reshape(n, h, w, p, p, chans)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, chans, h * p, w * p)


def pixel_targets(imgs: torch.Tensor, patch_size: int = 32, norm_pix: bool = True,
                  eps: float = 1e-6) -> torch.Tensor:
    """``(N, L, p*p*C)`` targets; with ``norm_pix`` each patch is standardised:
    ``(x - mean) / sqrt(var + eps)``, unbiased variance as the official code."""
    target = patchify(imgs, patch_size)
    if norm_pix:
        mean, std = patch_stats(target, eps)
        target = (target - mean) / std
    return target


def patch_stats(patches: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch ``(mean, sqrt(var + eps))`` of ``(N, L, D)`` patches, each ``(N, L, 1)``;
    unbiased variance as the official code. Normalised targets are ``(x - mean) / std``."""
    return patches.mean(dim=-1, keepdim=True), (patches.var(dim=-1, keepdim=True) + eps) ** 0.5


def pred_to_patches(pred: torch.Tensor) -> torch.Tensor:
    """Decoder output ``(N, p*p*C, h, w) -> (N, L, p*p*C)``."""
    n, c = pred.shape[:2]
    return pred.reshape(n, c, -1).transpose(1, 2)


def masked_mse_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor,
                    patch_size: int = 32, norm_pix: bool = True) -> torch.Tensor:
    """MSE per patch (mean over pixels), averaged over masked patches only.

    ``pred`` ``(N, p*p*C, h, w)``, ``imgs`` ``(N, C, H, W)``, ``mask`` ``(N, L)`` (1 = masked).
    With no masked patch at all (mask ratio 0) the loss is 0 rather than 0/0.
    """
    target = pixel_targets(imgs.float(), patch_size, norm_pix)
    per_patch = ((pred_to_patches(pred).float() - target) ** 2).mean(dim=-1)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)

"""FCMAE: sparse ConvNeXt V2 encoder + single-block decoder + masked pixel loss."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .convnextv2 import init_weights
from .decoder import fill_mask_tokens, make_decoder_blocks
from .loss import masked_mse_loss
from .masking import PATCH_SIZE, check_image_size, check_mask, check_mask_ratio, num_visible, random_mask
from .sparse_encoder import SparseConvNeXtV2Encoder
from .variants import get_variant


class FCMAE(nn.Module):
    """Fully convolutional masked autoencoder (ConvNeXt V2, arXiv 2301.00808).

    ``forward(imgs (N,3,H,W), mask=None, mask_ratio=None) -> (loss, pred, mask)`` with
    ``pred`` ``(N, p*p*3, H/p, W/p)`` and ``mask`` ``(N, L)``, 1 = masked, ``p = patch_size`` (32).
    State-dict keys: ``encoder.*`` (official dense layout), ``proj.*``, ``mask_token``,
    ``decoder.{j}.*``, ``pred.*``.
    """

    def __init__(
        self,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        in_chans: int = 3,
        decoder_depth: int = 1,
        decoder_embed_dim: int = 512,
        mask_ratio: float = 0.6,
        norm_pix_loss: bool = True,
        drop_path_rate: float = 0.0,
        backend: str = "sparse",
        grn_stats: str = "sample",
        dwconv: str = "auto",
        patch_size: int = PATCH_SIZE,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.mask_ratio = check_mask_ratio(mask_ratio)
        self.norm_pix_loss = norm_pix_loss
        self.encoder = SparseConvNeXtV2Encoder(depths, dims, in_chans, drop_path_rate, backend, grn_stats, dwconv,
                                               patch_size)
        self.proj = nn.Conv2d(dims[-1], decoder_embed_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_embed_dim, 1, 1))
        self.decoder = make_decoder_blocks(decoder_embed_dim, decoder_depth)
        self.pred = nn.Conv2d(decoder_embed_dim, self.patch_size ** 2 * in_chans, kernel_size=1)
        for m in (self.proj, self.decoder, self.pred):
            m.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def grid(self, imgs: torch.Tensor) -> tuple[int, int]:
        if imgs.dim() != 4 or imgs.shape[1] != self.in_chans:
            raise ValueError(f"expected images of shape (N, {self.in_chans}, H, W), got {tuple(imgs.shape)}")
        return check_image_size(imgs.shape[-2], imgs.shape[-1], self.patch_size)

    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor,
                        visible_per_sample: int | None = None) -> torch.Tensor:
        """Dense-shaped encoder features ``(N, C_last, H/p, W/p)``, zeros at masked sites."""
        return self.encoder(imgs, mask, visible_per_sample)

    def forward_decoder(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(N, C_last, h, w) -> (N, p*p*3, h, w)``."""
        x = fill_mask_tokens(self.proj(x), mask, self.mask_token)
        return self.pred(self.decoder(x))

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mse_loss(pred, imgs, mask, self.patch_size, self.norm_pix_loss)

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor | None = None,
                mask_ratio: float | None = None, visible_per_sample: int | None = None):
        """``visible_per_sample``, with a given ``mask``, promises that every sample keeps
        exactly that many patches: no host sync. The training loop passes the count its data
        pipeline checked (``data.collate_masked``)."""
        h, w = self.grid(imgs)
        if mask is not None and visible_per_sample is not None:
            visible = visible_per_sample
        elif mask is None:
            ratio = check_mask_ratio(self.mask_ratio if mask_ratio is None else mask_ratio)
            mask = random_mask(imgs.shape[0], h * w, ratio, device=imgs.device)
            visible = num_visible(h * w, ratio)  # static count: no host sync in the encoder
        else:
            mask = check_mask(mask.to(imgs.device), imgs.shape[0], (h, w))
            visible = None
        latent = self.encoder(imgs, mask, visible, mask_checked=True)  # validated once, here
        pred = self.forward_decoder(latent, mask)
        return self.forward_loss(imgs, pred, mask), pred, mask


def create_fcmae(name: str = "convnextv2_atto", **overrides) -> FCMAE:
    """Build an FCMAE for a named size, e.g. ``create_fcmae("convnextv2_atto", backend="dense")``.

    ``overrides`` are FCMAE arguments: ``backend``, ``grn_stats``, ``dwconv``, ``mask_ratio``,
    ``decoder_depth``, ``decoder_embed_dim``, ``norm_pix_loss``, ``drop_path_rate``, ``in_chans``,
    ``patch_size``.
    """
    v = get_variant(name)
    for key in ("depths", "dims"):
        if key in overrides:
            raise TypeError(f"{key} is fixed by the model name; build FCMAE(...) directly for a custom shape")
    return FCMAE(depths=v.depths, dims=v.dims, **overrides)

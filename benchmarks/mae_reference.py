"""MAE ViT-B/16 as in the MAE paper (He et al. 2021), the speed reference of issue #19: a 12-block
768-d encoder on the visible 25% of the 16-px patches, an 8-block 512-d decoder over all patches
with mask tokens, per-patch normalised pixel loss on the masked ones. Built from timm's ViT ``Block``
(fused attention); fixed 2-D sin-cos position embeddings, no class token (it does not change the
cost). For timing next to FCMAE in ``step_time.py``, not for training."""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

PATCH = 16


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """``(grid * grid, dim)`` fixed 2-D sin-cos position embedding."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angles = coord[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


class MaeVitB16(nn.Module):
    def __init__(self, img_size: int = 224, mask_ratio: float = 0.75, dim: int = 768, depth: int = 12,
                 heads: int = 12, dec_dim: int = 512, dec_depth: int = 8, dec_heads: int = 16):
        super().__init__()
        self.grid = img_size // PATCH
        self.num_patches = self.grid ** 2
        self.keep = int(self.num_patches * (1 - mask_ratio))
        self.patch_embed = nn.Conv2d(3, dim, PATCH, PATCH)
        self.register_buffer("pos", sincos_2d(dim, self.grid)[None], persistent=False)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.dec_embed = nn.Linear(dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.register_buffer("dec_pos", sincos_2d(dec_dim, self.grid)[None], persistent=False)
        self.dec_blocks = nn.ModuleList(Block(dec_dim, dec_heads, mlp_ratio=4.0, qkv_bias=True)
                                        for _ in range(dec_depth))
        self.dec_norm = nn.LayerNorm(dec_dim)
        self.pred = nn.Linear(dec_dim, PATCH * PATCH * 3)

    def random_masking(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids_keep (N, keep), mask (N, L) 1 = masked)``, as MAE draws them (argsort of noise)."""
        shuffle = torch.argsort(torch.rand(n, self.num_patches, device=device), dim=1)
        mask = torch.ones(n, self.num_patches, device=device)
        mask.scatter_(1, shuffle[:, :self.keep], 0.0)
        return shuffle[:, :self.keep], mask

    def encoder(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(imgs).flatten(2).transpose(1, 2) + self.pos
        x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def loss(self, imgs: torch.Tensor, ids_keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        latent = self.dec_embed(self.encoder(imgs, ids_keep))
        n, _, d = latent.shape
        x = self.mask_token.to(latent.dtype).expand(n, self.num_patches, d).clone()
        x = x.scatter(1, ids_keep[..., None].expand(-1, -1, d), latent) + self.dec_pos
        for blk in self.dec_blocks:
            x = blk(x)
        pred = self.pred(self.dec_norm(x))
        g = self.grid
        target = imgs.reshape(n, 3, g, PATCH, g, PATCH).permute(0, 2, 4, 3, 5, 1).reshape(n, g * g, -1)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = ((pred.float() - target) ** 2).mean(-1)
        return (per_patch * mask).sum() / mask.sum()

"""The ``dense`` backend: a masked-dense reference on full ``(N, C, H, W)`` canvases.

Inactive sites are zero and re-zeroed after every op that would write there
(conv bias, LayerNorm bias, Linear bias, GRN beta). Slow by design; it is the
readable statement of what the ``sparse`` backend must equal.
"""
from __future__ import annotations

import torch

from ..models.convnextv2 import GRN, Block
from ..models.masking import upsample_visible


def grn_masked(grn: GRN, x: torch.Tensor, stats: str) -> torch.Tensor:
    """GRN on channels-last ``(N, H, W, C)`` whose inactive sites are zero."""
    dims = (0, 1, 2) if stats == "batch" else (1, 2)
    nx = grn.normalizer(torch.linalg.vector_norm(x, ord=2, dim=dims, keepdim=True))
    return grn.gamma.view(-1) * (x * nx) + grn.beta.view(-1) + x


def block_masked(block: Block, x: torch.Tensor, active: torch.Tensor, grn_stats: str):
    """One block on ``(N, C, H, W)``; ``active`` is ``(N, 1, H, W)`` with 1 at active sites."""
    active_cl = active.permute(0, 2, 3, 1)
    y = (block.dwconv(x) * active).permute(0, 2, 3, 1)
    y = block.norm(y) * active_cl
    y = block.act(block.pwconv1(y) * active_cl)
    y = grn_masked(block.grn, y, grn_stats) * active_cl
    y = (block.pwconv2(y) * active_cl).permute(0, 3, 1, 2)
    return x + block.drop_path(y)


def encoder_forward(encoder, imgs: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int],
                    visible_per_sample: int | None = None) -> torch.Tensor:
    """``(N, 3, H, W)`` + mask ``(N, L)`` -> ``(N, C_last, H/32, W/32)``, zeros at masked sites.
    ``visible_per_sample`` is part of every backend's signature; full canvases need no count."""
    num_stages = len(encoder.stages)
    x = imgs
    for k, (down, stage) in enumerate(zip(encoder.downsample_layers, encoder.stages)):
        active = upsample_visible(mask, grid, 2 ** (num_stages - 1 - k)).to(imgs.dtype)
        if k == 0:
            x = down(x) * active  # dense stem, then mask (as the official code)
        else:
            x = down[1](down[0](x) * prev_active) * active
        for block in stage:
            x = block_masked(block, x, active, encoder.grn_stats)
        prev_active = active
    return x

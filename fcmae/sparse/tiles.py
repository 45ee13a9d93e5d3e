"""Tiles: the active sites of one stage grouped by visible patch, for kernels that never build a
canvas (:mod:`fcmae.sparse.triton_dwconv`).

Masking is per 32-px patch, so at a stage of stride ``32 / t`` each visible patch is a ``t x t``
tile of active sites (``t = 8, 4, 2, 1``), and the hierarchical row order of
:class:`fcmae.sparse.layout.SparseLayout` puts a tile's sites in ``t * t`` consecutive rows:
tile ``p`` holds rows ``[p * t * t, (p + 1) * t * t)``, its sites in Z order (at each level the
four children in ``(dy, dx) = (0,0), (0,1), (1,0), (1,1)`` order, so a site's row offset
interleaves the bits of its local ``y`` (high) and ``x`` (low)). A ``k x k`` conv at a site
reaches ``k // 2`` sites out, i.e. up to ``reach = ceil((k // 2) / t)`` tiles away; the
neighbour table lists, for every tile, the tile at each offset in ``[-reach, reach]^2`` (-1 where
that patch is masked or off the image).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StageTiles:
    """``neighbours``: ``(P, (2 * reach + 1) ** 2)`` int32 tile index at each tile offset (row-major
    over ``(oy, ox)``), -1 for none; ``tile``: sites per side ``t``; ``reach`` in tiles."""
    neighbours: torch.Tensor
    tile: int
    reach: int

    @property
    def num_tiles(self) -> int:
        return self.neighbours.shape[0]


def neighbour_table(sample: torch.Tensor, patch: torch.Tensor, batch: int, grid: tuple[int, int], tile: int,
                    kernel_size: int = 7) -> StageTiles:
    """Tiles of a stage with ``tile x tile`` sites per patch. ``sample``, ``patch``: ``(P,)`` the visible
    patches in row order (:meth:`SparseLayout.from_mask`), patches raster-indexed on an ``h x w`` grid."""
    h, w = grid
    device = patch.device
    reach = -(-(kernel_size // 2) // tile)
    # the patch grid padded by `reach` on every side: every neighbour lookup is in bounds
    tile_of = torch.full((batch, h + 2 * reach, w + 2 * reach), -1, dtype=torch.int32, device=device)
    py, px = patch // w + reach, patch % w + reach
    tile_of[sample, py, px] = torch.arange(patch.shape[0], dtype=torch.int32, device=device)
    offsets = torch.arange(-reach, reach + 1, device=device)
    oy = offsets.repeat_interleave(offsets.numel())
    ox = offsets.repeat(offsets.numel())
    neighbours = tile_of[sample[:, None], py[:, None] + oy, px[:, None] + ox]
    return StageTiles(neighbours.contiguous(), tile, reach)

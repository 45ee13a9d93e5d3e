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
that patch is masked or off the image). The halo table, built from it once per stage and batch,
lists the row of every site a tile's ``k x k`` conv reads: ``(t + k - 1)^2`` sites, raster order,
-1 where inactive. The kernels index it with one add per tap (``ky * (t + k - 1) + kx``), where
finding the row from the neighbour table took ~60 instructions of bit arithmetic per tap (#38).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StageTiles:
    """``neighbours``: ``(P, (2 * reach + 1) ** 2)`` int32 tile index at each tile offset (row-major
    over ``(oy, ox)``), -1 for none; ``tile``: sites per side ``t``; ``reach`` in tiles; ``halo``:
    ``(P, (t + k - 1) ** 2)`` int32 row of each site the conv reads around tile ``p`` (raster order
    from ``(-(k // 2), -(k // 2))``), -1 for an inactive one."""
    neighbours: torch.Tensor
    tile: int
    reach: int
    halo: torch.Tensor

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
    neighbours = tile_of[sample[:, None], py[:, None] + oy, px[:, None] + ox].contiguous()
    return StageTiles(neighbours, tile, reach, halo_table(neighbours, tile, reach, kernel_size))


def z_order(ly: torch.Tensor, lx: torch.Tensor, tile: int) -> torch.Tensor:
    """Row offset inside a tile of local site ``(ly, lx)``: the bits of ``y`` (high) and ``x`` interleaved."""
    out = torch.zeros(torch.broadcast_shapes(ly.shape, lx.shape), dtype=ly.dtype, device=ly.device)
    for b in range(tile.bit_length() - 1):
        out |= ((ly >> b) & 1) << (2 * b + 1) | ((lx >> b) & 1) << (2 * b)
    return out


def halo_table(neighbours: torch.Tensor, tile: int, reach: int, kernel_size: int = 7) -> torch.Tensor:
    """``(P, H * H)`` int32, ``H = tile + kernel_size - 1``: the row of each site of tile ``p``'s halo
    (local coordinates ``-(k // 2) .. tile - 1 + k // 2`` in both axes, raster order), -1 where its patch
    is masked or off the image."""
    half = kernel_size // 2
    side = tile + 2 * half
    local = torch.arange(side, device=neighbours.device) - half + reach * tile  # >= 0: floors are shifts
    ty, ly = local // tile, local % tile  # the neighbour tile offset (shifted by reach) and the site in it
    nb_side = 2 * reach + 1
    slot = (ty[:, None] * nb_side + ty[None, :]).flatten()  # (H * H,): which neighbour, per halo site
    offset = z_order(ly[:, None], ly[None, :], tile).flatten()
    nb = neighbours[:, slot].long()
    rows = torch.where(nb >= 0, nb * (tile * tile) + offset, -1)
    return rows.to(torch.int32).contiguous()

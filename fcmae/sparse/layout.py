"""Active-site bookkeeping for the sparse encoder.

The mask lives on the 32-px patch grid, so at every stage a patch is a
``s x s`` block of sites (``s = 8, 4, 2, 1`` for strides 4, 8, 16, 32) that is
entirely active or entirely inactive.

Rows are ordered hierarchically: at the coarsest stage, visible patches in
(sample, raster) order; at each finer stage, every coarser row is replaced by
its four children in ``(dy, dx) = (0,0), (0,1), (1,0), (1,1)`` order. So:

- rows of one sample are contiguous (per-sample GRN is a reshape when every
  sample keeps the same number of patches);
- the four children of a coarse site are four consecutive rows, so the 2x2
  stride-2 downsample is a reshape ``(R, C) -> (R/4, 4C)`` and one matmul,
  with no gather at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .tiles import StageTiles, neighbour_table

# Child offsets in the order the rows use; the downsample weight is laid out to match.
_DY = torch.tensor([0, 0, 1, 1])
_DX = torch.tensor([0, 1, 0, 1])


@dataclass
class StageSites:
    """Active sites of one stage.

    ``canvas_index``: ``(R,)`` flat index of each row into an ``(N*H*W)`` canvas
    (sample-major, raster order). ``sample_index``: ``(R,)`` sample of each row.
    ``size``: ``(H, W)`` of the stage.
    """

    canvas_index: torch.Tensor
    sample_index: torch.Tensor
    size: tuple[int, int]

    @property
    def num_rows(self) -> int:
        return self.canvas_index.shape[0]


class SparseLayout:
    """Active sites at every encoder stage for one batch.

    ``stages[k]`` is stage ``k`` (``k = 0`` finest, stride 4). ``rows_per_sample[k]``
    is the fixed row count of each sample at stage ``k`` when every sample keeps
    the same number of patches, else None (then per-sample reductions use
    ``index_add`` instead of a reshape).
    """

    def __init__(self, batch: int, stages: list[StageSites], rows_per_sample: list[int] | None,
                 patches: tuple[torch.Tensor, torch.Tensor, tuple[int, int]] | None = None):
        self.batch = batch
        self.stages = stages
        self.rows_per_sample = rows_per_sample
        self.patches = patches  # (sample, patch, grid) of the visible patches, in row order
        self._tiles = {}

    def tiles(self, stage: int, kernel_size: int = 7) -> StageTiles:
        """Stage ``stage``'s tiles and neighbour table (:mod:`fcmae.sparse.tiles`), built once per batch."""
        key = (stage, kernel_size)
        if key not in self._tiles:
            sample, patch, grid = self.patches
            tile = 2 ** (len(self.stages) - 1 - stage)
            self._tiles[key] = neighbour_table(sample, patch, self.batch, grid, tile, kernel_size)
        return self._tiles[key]

    @classmethod
    def from_mask(cls, mask: torch.Tensor, grid: tuple[int, int], num_stages: int = 4,
                  visible_per_sample: int | None = None) -> "SparseLayout":
        """Build from a ``(N, L)`` mask (1 = masked) on an ``h x w`` patch grid.

        Pass ``visible_per_sample`` when every sample is known to keep exactly
        that many patches: the visible set is then found by a sort with a static
        size (no host sync, friendly to ``torch.compile``).
        """
        n = mask.shape[0]
        h, w = grid
        device = mask.device
        if visible_per_sample is not None:
            # Stable sort puts visible (0) patches first, in ascending patch order.
            keep = torch.argsort(mask, dim=1, stable=True)[:, :visible_per_sample]
            sample = torch.arange(n, device=device).repeat_interleave(visible_per_sample)
            patch = keep.reshape(-1)
        else:
            sample, patch = (mask == 0).nonzero(as_tuple=True)
        patches = (sample, patch, grid)
        y, x = patch // w, patch % w

        coords = [(sample, y, x)]
        dy, dx = _DY.to(device), _DX.to(device)
        for _ in range(num_stages - 1):
            sample = sample[:, None].expand(-1, 4).reshape(-1)
            y = (2 * y[:, None] + dy).reshape(-1)
            x = (2 * x[:, None] + dx).reshape(-1)
            coords.append((sample, y, x))
        coords.reverse()  # finest first

        stages = []
        for k, (s, yy, xx) in enumerate(coords):
            scale = 2 ** (num_stages - 1 - k)
            size = (h * scale, w * scale)
            index = (s * size[0] + yy) * size[1] + xx
            stages.append(StageSites(index, s, size))
        rows = None
        if visible_per_sample is not None:
            rows = [visible_per_sample * 4 ** (num_stages - 1 - k) for k in range(num_stages)]
        return cls(n, stages, rows, patches)

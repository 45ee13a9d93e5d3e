"""The FCMAE encoder: ConvNeXt V2 parameters, run by an interchangeable sparse backend."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .convnextv2 import init_weights, make_trunk
from ..sparse import BACKENDS, DWCONV, GRN_STATS
from .masking import PATCH_SIZE, check_image_size, check_mask, stem_stride


def _backend_forward(name: str):
    if name == "sparse":
        from ..sparse.compact import encoder_forward
    elif name == "dense":
        from ..sparse.masked_dense import encoder_forward
    elif name == "minkowski":
        from ..sparse.minkowski import encoder_forward
    else:
        raise ValueError(f"unknown encoder backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    return encoder_forward


class SparseConvNeXtV2Encoder(nn.Module):
    """ConvNeXt V2 trunk that computes only on visible patches.

    Parameters have the official dense layout and names
    (``downsample_layers.{0..3}.{0,1}``, ``stages.i.j.*``), whatever the backend.

    Args:
        backend: ``sparse`` (compact active rows, default), ``dense`` (masked-dense
            reference) or ``minkowski`` (MinkowskiEngine, optional).
        grn_stats: ``sample`` (GRN norm over each sample's active sites, what the
            dense model computes at fine-tune time) or ``batch`` (pooled over all
            active sites of the batch, as the official ``MinkowskiGRN``).
        dwconv: the ``sparse`` backend's depthwise conv: ``tiles`` (Triton, active sites only),
            ``canvas`` (zero canvas + dense conv) or ``auto`` (tiles on CUDA when Triton is there).
        patch_size: the mask patch in pixels (32; 16 or 8 for small tiles): the stem's stride is
            ``patch_size / 8``, so a patch is ``8 x 8`` sites of the first stage whatever its size.
    """

    def __init__(self, depths: Sequence[int], dims: Sequence[int], in_chans: int = 3,
                 drop_path_rate: float = 0.0, backend: str = "sparse", grn_stats: str = "sample",
                 dwconv: str = "auto", patch_size: int = PATCH_SIZE):
        super().__init__()
        self.patch_size = patch_size
        stem = stem_stride(patch_size)
        if grn_stats not in GRN_STATS:
            raise ValueError(f"grn_stats={grn_stats!r} is not supported; use {' or '.join(map(repr, GRN_STATS))}")
        if dwconv not in DWCONV:
            raise ValueError(f"dwconv={dwconv!r} is not supported; use {' or '.join(map(repr, DWCONV))}")
        self.set_backend(backend)
        self.grn_stats, self.dwconv = grn_stats, dwconv
        self.activation_checkpointing = "off"  # off | stage | block: the sparse backend recomputes in the backward
        self.depths, self.dims = tuple(depths), tuple(dims)
        self.downsample_layers, self.stages = make_trunk(in_chans, depths, dims, drop_path_rate, stem)
        self.apply(init_weights)

    def set_backend(self, backend: str) -> None:
        """Switch the implementation; parameters and state dict are the same for every backend."""
        self._forward_impl = _backend_forward(backend)
        self.backend = backend

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor,
                visible_per_sample: int | None = None, mask_checked: bool = False) -> torch.Tensor:
        """``(N, 3, H, W)``, mask ``(N, L)`` (1 = masked) -> ``(N, C_last, H/32, W/32)``.

        Masked sites of the output are zero. ``visible_per_sample`` promises that
        every sample keeps exactly that many patches (skips a host sync); the training
        pipeline counts it from the masks (``data.collate_masked``). ``mask_checked``: the
        caller (FCMAE) has validated the mask already.
        """
        grid = check_image_size(imgs.shape[-2], imgs.shape[-1], self.patch_size)
        if visible_per_sample is None and not mask_checked:
            mask = check_mask(mask, imgs.shape[0], grid)
        return self._forward_impl(self, imgs, mask, grid, visible_per_sample)

    def forward_unmasked(self, imgs: torch.Tensor) -> torch.Tensor:
        """Plain dense forward (nothing masked, per-sample GRN): ``(N, C_last, H/32, W/32)``."""
        x = imgs
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return x

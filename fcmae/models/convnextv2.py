"""Dense ConvNeXt V2 building blocks with the official parameter names.

These modules own every parameter of the encoder. The sparse backends in
``fcmae.sparse`` run the *same* modules on compact active-site features, so a
checkpoint is one layout whatever backend trained it, and the dense model used
for fine-tuning and export verification is this file.

Official names (``convnextv2.py`` of facebookresearch/ConvNeXt-V2):
``downsample_layers.{0..3}.{0,1}``, ``stages.i.j.{dwconv,norm,pwconv1,grn,pwconv2}``,
``norm``, ``head``; GRN ``gamma``/``beta`` of shape ``(1, 1, 1, 4C)``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

LN_EPS = 1e-6
GRN_EPS = 1e-6


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an ``(N, C, H, W)`` tensor."""

    def __init__(self, dim: int, eps: float = LN_EPS):
        super().__init__(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalization on channels-last ``(N, H, W, C)`` input.

    ``Gx = ||x||_2`` over the spatial sites of each sample,
    ``Nx = Gx / (mean_c(Gx) + eps)``, ``out = gamma * (x * Nx) + beta + x``.
    """

    def __init__(self, dim: int, eps: float = GRN_EPS):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def normalizer(self, gx: torch.Tensor) -> torch.Tensor:
        """``Nx`` from the per-channel norms ``gx`` (channels on the last axis)."""
        return gx / (gx.mean(dim=-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        return self.gamma * (x * self.normalizer(gx)) + self.beta + x


class DropPath(nn.Module):
    """Stochastic depth: drops the residual branch of whole samples."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def sample_scale(self, n: int, like: torch.Tensor) -> torch.Tensor | None:
        """Per-sample factor ``(n,)`` (0 or 1/keep), or None when inactive.

        Shared by all backends so that, under one RNG state, they drop the
        same samples.
        """
        if self.p == 0.0 or not self.training:
            return None
        keep = 1.0 - self.p
        return like.new_empty(n).bernoulli_(keep).div_(keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.sample_scale(x.shape[0], x)
        if scale is None:
            return x
        return x * scale.view(-1, *([1] * (x.ndim - 1)))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """ConvNeXt V2 block on ``(N, C, H, W)``.

    dwconv 7x7 -> LayerNorm -> Linear(C, 4C) -> GELU -> GRN -> Linear(4C, C) -> + residual.
    """

    def __init__(self, dim: int, drop_path: float = 0.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.dwconv(x).permute(0, 2, 3, 1)
        x = self.pwconv2(self.grn(self.act(self.pwconv1(self.norm(x)))))
        return shortcut + self.drop_path(x.permute(0, 3, 1, 2))


def make_stem(in_chans: int, dim: int, stride: int = 4) -> nn.Sequential:
    """``s x s`` stride-``s`` patchify conv + channels-first LayerNorm: ``(N,3,H,W) -> (N,C,H/s,W/s)``
    (``s = 4`` in ConvNeXt V2; 2 or 1 for 16- or 8-pixel mask patches)."""
    return nn.Sequential(nn.Conv2d(in_chans, dim, kernel_size=stride, stride=stride), LayerNorm2d(dim))


def make_downsample(dim_in: int, dim_out: int) -> nn.Sequential:
    """LayerNorm + 2x2 stride-2 conv: ``(N,C_in,H,W) -> (N,C_out,H/2,W/2)``."""
    return nn.Sequential(LayerNorm2d(dim_in), nn.Conv2d(dim_in, dim_out, kernel_size=2, stride=2))


def make_trunk(in_chans: int, depths: Sequence[int], dims: Sequence[int], drop_path_rate: float,
               stem_stride: int = 4):
    """``(downsample_layers, stages)`` ModuleLists with the official structure (a stem of ``stem_stride``).

    Drop-path rates rise linearly over all blocks from 0 to ``drop_path_rate``.
    """
    downsample_layers = nn.ModuleList([make_stem(in_chans, dims[0], stem_stride)])
    downsample_layers.extend(make_downsample(dims[i], dims[i + 1]) for i in range(len(dims) - 1))
    total = sum(depths)
    rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    stages = nn.ModuleList()
    start = 0
    for depth, dim in zip(depths, dims):
        stages.append(nn.Sequential(*[Block(dim, rates[start + j]) for j in range(depth)]))
        start += depth
    return downsample_layers, stages


def init_weights(module: nn.Module) -> None:
    """Truncated normal (std 0.02) for conv/linear weights, zero biases.

    LayerNorm (ones/zeros) and GRN (zeros) keep their constructor init.
    """
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ConvNeXtV2(nn.Module):
    """Plain dense ConvNeXt V2 classifier with the official parameter names.

    ``forward_features``: ``(N, 3, H, W) -> (N, C_last, H/32, W/32)`` (before pooling);
    ``forward``: pooled, ``norm``, ``head`` -> ``(N, num_classes)``.
    """

    def __init__(
        self,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        in_chans: int = 3,
        num_classes: int = 1000,
        drop_path_rate: float = 0.0,
        stem_stride: int = 4,
    ):
        super().__init__()
        self.depths, self.dims = tuple(depths), tuple(dims)
        self.downsample_layers, self.stages = make_trunk(in_chans, depths, dims, drop_path_rate, stem_stride)
        self.norm = nn.LayerNorm(dims[-1], eps=LN_EPS)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.forward_features(x).mean(dim=(-2, -1))))

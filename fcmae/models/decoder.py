"""The FCMAE decoder pieces: mask-token fill-in and the dense ConvNeXt V2 decoder blocks.

They are attributes of :class:`~fcmae.models.fcmae.FCMAE` itself (``proj``,
``mask_token``, ``decoder.{j}``, ``pred``) so that state-dict keys match the
official release.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .convnextv2 import Block


def make_decoder_blocks(dim: int, depth: int) -> nn.Sequential:
    """``depth`` dense ConvNeXt V2 blocks on the 1/32 grid (no drop path)."""
    if depth < 1:
        raise ValueError(f"decoder_depth={depth}; the decoder needs at least one block")
    return nn.Sequential(*[Block(dim, drop_path=0.0) for _ in range(depth)])


def fill_mask_tokens(x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """Replace masked sites of ``x`` ``(N, D, h, w)`` by ``mask_token`` ``(1, D, 1, 1)``.

    ``mask`` is ``(N, h*w)`` with 1 = masked.
    """
    n, _, h, w = x.shape
    m = mask.view(n, 1, h, w).to(x.dtype)
    return x * (1.0 - m) + mask_token.to(x.dtype) * m

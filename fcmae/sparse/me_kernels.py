"""MinkowskiEngine kernel order <-> dense conv weights: pure tensor maps, shared by the
converter (reading and writing official sparse checkpoints) and the ``minkowski`` backend.

MinkowskiEngine enumerates kernel offsets with the FIRST spatial axis fastest, so a
``(K*K, ...)`` kernel maps to dense by a reshape and then a swap of the two spatial axes.
"""
from __future__ import annotations

import torch

__all__ = ["me_depthwise_to_dense", "dense_depthwise_to_me", "me_conv_to_dense", "dense_conv_to_me"]


def me_depthwise_to_dense(kernel: torch.Tensor) -> torch.Tensor:
    """``(K*K, C)`` MinkowskiEngine channelwise kernel -> ``(C, 1, K, K)`` conv weight."""
    kk, c = kernel.shape
    k = int(round(kk ** 0.5))
    return kernel.permute(1, 0).reshape(c, 1, k, k).transpose(3, 2).contiguous()


def dense_depthwise_to_me(weight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`me_depthwise_to_dense`: ``(C, 1, K, K) -> (K*K, C)``."""
    c, _, k, _ = weight.shape
    return weight.transpose(3, 2).reshape(c, k * k).permute(1, 0).contiguous()


def me_conv_to_dense(kernel: torch.Tensor) -> torch.Tensor:
    """``(K*K, C_in, C_out)`` MinkowskiEngine kernel -> ``(C_out, C_in, K, K)`` conv weight."""
    kk, cin, cout = kernel.shape
    k = int(round(kk ** 0.5))
    return kernel.permute(2, 1, 0).reshape(cout, cin, k, k).transpose(3, 2).contiguous()


def dense_conv_to_me(weight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`me_conv_to_dense`: ``(C_out, C_in, K, K) -> (K*K, C_in, C_out)``."""
    cout, cin, k, _ = weight.shape
    return weight.transpose(3, 2).reshape(cout, cin, k * k).permute(2, 1, 0).contiguous()

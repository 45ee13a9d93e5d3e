"""The ``sparse`` backend: ConvNeXt V2 on a compact ``(rows, C)`` tensor of active sites.

Only the depthwise conv touches a full canvas (scatter rows to zeros, convolve,
gather the active rows back), unless the Triton tile kernel replaces it (``dwconv``):
inactive inputs count as zero and outputs exist only at active sites, i.e. submanifold
semantics. Everything else (LayerNorm,
the two Linears, GELU, GRN, drop path, the downsample) runs on active rows only.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F

from ..models.convnextv2 import GRN, Block
from .grn import grn_per_sample
from .layout import SparseLayout, StageSites


def scatter_to_canvas(rows: torch.Tensor, sites: StageSites, batch: int) -> torch.Tensor:
    """``(R, C)`` rows -> ``(N, C, H, W)`` zero canvas (channels-last memory)."""
    h, w = sites.size
    canvas = rows.new_zeros(batch * h * w, rows.shape[1])
    canvas = canvas.index_copy(0, sites.canvas_index, rows)
    return canvas.view(batch, h, w, -1).permute(0, 3, 1, 2)


def gather_from_canvas(canvas: torch.Tensor, sites: StageSites) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(R, C)`` rows at the active sites."""
    flat = canvas.permute(0, 2, 3, 1).reshape(-1, canvas.shape[1])
    return flat.index_select(0, sites.canvas_index)


def depthwise_conv_channels_last(conv: torch.nn.Conv2d, canvas: torch.Tensor) -> torch.Tensor:
    """``conv`` on a channels-last canvas, with the weight grad in the parameter's own strides.

    Convolving a channels-last input yields a weight grad with channels-last
    strides; for a ``(C, 1, k, k)`` weight that is the same memory, but DDP
    compares strides exactly, warns, and copies every step. Viewing the weight
    as channels-last makes autograd hand back a grad with the parameter's strides.
    """
    w = conv.weight
    k = w.shape[2] * w.shape[3]
    w = w.as_strided(w.shape, (k * w.shape[1], 1, w.shape[3] * w.shape[1], w.shape[1]))
    return F.conv2d(canvas, w, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def per_sample_reduce(values: torch.Tensor, layout: SparseLayout, stage: int) -> torch.Tensor:
    """Sum ``(R, C)`` rows per sample -> ``(N, C)``."""
    rows = layout.rows_per_sample
    if rows is not None:
        return values.view(layout.batch, rows[stage], -1).sum(dim=1)
    out = values.new_zeros(layout.batch, values.shape[1])
    return out.index_add(0, layout.stages[stage].sample_index, values)


def per_sample_expand(values: torch.Tensor, layout: SparseLayout, stage: int) -> torch.Tensor:
    """``(N, C)`` -> ``(R, C)``, each row getting its sample's values."""
    rows = layout.rows_per_sample
    if rows is not None:
        return values[:, None, :].expand(-1, rows[stage], -1).reshape(-1, values.shape[1])
    return values.index_select(0, layout.stages[stage].sample_index)


def grn_rows(grn: GRN, x: torch.Tensor, layout: SparseLayout, stage: int, stats: str) -> torch.Tensor:
    """GRN on rows; the L2 norm is over a sample's active sites, or the whole batch's."""
    if stats == "batch":
        nx = grn.normalizer(torch.linalg.vector_norm(x, ord=2, dim=0, keepdim=True))
    elif layout.rows_per_sample is not None:  # the training path: one autograd function on the (N, R, C) view
        n, r = layout.batch, layout.rows_per_sample[stage]
        return grn_per_sample(x.view(n, r, -1), grn.gamma, grn.beta, grn.eps).view(x.shape)
    else:
        gx = per_sample_reduce(x * x, layout, stage).sqrt()
        nx = per_sample_expand(grn.normalizer(gx), layout, stage)
    return grn.gamma.view(-1) * (x * nx) + grn.beta.view(-1) + x


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def tiles_usable(x: torch.Tensor) -> bool:
    """Whether the Triton tile kernel can run on ``x``: CUDA with Triton, or the CPU under
    ``TRITON_INTERPRET=1`` (for tests; slow)."""
    return _triton_installed() and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def depthwise_rows(conv: torch.nn.Conv2d, x: torch.Tensor, layout: SparseLayout, stage: int, dwconv: str):
    """The block's depthwise conv on ``(R, C)`` rows, submanifold: ``tiles`` (Triton, only the active
    sites, :mod:`fcmae.sparse.triton_dwconv`) or ``canvas`` (scatter to a zero canvas, cuDNN/ATen
    conv, gather back: the reference); ``auto`` = tiles where they run, else canvas."""
    if dwconv == "tiles" or (dwconv == "auto" and x.is_cuda and tiles_usable(x)):
        if dwconv == "tiles" and not tiles_usable(x):
            raise RuntimeError("encoder.dwconv=tiles needs Triton and a CUDA device (or TRITON_INTERPRET=1 "
                               "on the CPU, for tests); use encoder.dwconv=canvas or auto")
        from .triton_dwconv import depthwise_conv_tiles
        return depthwise_conv_tiles(x, conv, layout.tiles(stage, conv.kernel_size[0]))
    sites = layout.stages[stage]
    canvas = scatter_to_canvas(x, sites, layout.batch)
    return gather_from_canvas(depthwise_conv_channels_last(conv, canvas), sites)


def layer_norm_rows(norm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channels of ``(R, C)`` rows, in x's dtype: CUDA autocast would run it in fp32 and
    hand the next Linear a full-size fp32 tensor to cast back (forward and backward); the kernel accumulates
    its statistics in fp32 either way, and its weight and bias stay fp32 parameters (mixed-dtype LayerNorm)."""
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def block_rows(block: Block, x: torch.Tensor, layout: SparseLayout, stage: int, grn_stats: str,
               dwconv: str = "auto"):
    """One ConvNeXt V2 block on ``(R, C)`` rows."""
    y = depthwise_rows(block.dwconv, x, layout, stage, dwconv)
    y = block.act(block.pwconv1(layer_norm_rows(block.norm, y)))
    y = block.pwconv2(grn_rows(block.grn, y, layout, stage, grn_stats))
    scale = block.drop_path.sample_scale(layout.batch, y)
    if scale is not None:
        rows = layout.rows_per_sample
        if rows is not None:  # broadcast over the (N, R, C) view: no expanded copy
            y = (y.view(layout.batch, rows[stage], -1) * scale[:, None, None].to(y.dtype)).view(y.shape)
        else:
            y = y * per_sample_expand(scale[:, None], layout, stage)
    return x + y


def stem_rows(stem, imgs: torch.Tensor, sites: StageSites) -> torch.Tensor:
    """Stem on the visible 4x4 pixel cells only: ``(N, 3, H, W) -> (R0, C0)``.

    A 4x4 stride-4 conv is a Linear on each cell, so this equals the dense stem
    followed by masking, without computing the masked cells.
    """
    conv, norm = stem[0], stem[1]
    n, c, h, w = imgs.shape
    k = conv.kernel_size[0]
    cells = imgs.view(n, c, h // k, k, w // k, k).permute(0, 2, 4, 1, 3, 5).reshape(-1, c * k * k)
    x = F.linear(cells.index_select(0, sites.canvas_index), conv.weight.flatten(1), conv.bias)
    return layer_norm_rows(norm, x)


def downsample_rows(down, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm + 2x2 stride-2 conv: ``(R, C_in) -> (R/4, C_out)``.

    The four children of each coarse site are consecutive rows in (dy, dx)
    order, so the conv is one Linear over the concatenated children.
    """
    norm, conv = down[0], down[1]
    x = layer_norm_rows(norm, x)
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)  # (out, dy, dx, in)
    return F.linear(x.reshape(-1, 4 * x.shape[1]), weight, conv.bias)


def encoder_forward(encoder, imgs: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int],
                    visible_per_sample: int | None = None) -> torch.Tensor:
    """``(N, 3, H, W)`` + mask ``(N, L)`` -> ``(N, C_last, H/32, W/32)``, zeros at masked sites."""
    layout = SparseLayout.from_mask(mask, grid, len(encoder.stages), visible_per_sample)
    x = stem_rows(encoder.downsample_layers[0], imgs, layout.stages[0])
    recompute = getattr(encoder, "activation_checkpointing", "off") if encoder.training else "off"
    for k, stage in enumerate(encoder.stages):
        if k > 0:
            x = downsample_rows(encoder.downsample_layers[k], x)
        dwconv = getattr(encoder, "dwconv", "auto")  # one choice, or one a stage (encoder.dwconv=auto by speed)
        dwconv = dwconv[k] if isinstance(dwconv, (list, tuple)) else dwconv

        def run_blocks(x, blocks=tuple(stage), k=k, dwconv=dwconv):
            for block in blocks:
                x = _checkpointed(block_rows, recompute == "block", block, x, layout, k, encoder.grn_stats, dwconv)
            return x
        x = _checkpointed(run_blocks, recompute == "stage", x)
    return scatter_to_canvas(x, layout.stages[-1], layout.batch).contiguous()


def _checkpointed(fn, recompute: bool, *args):
    """``fn(*args)``, its activations recomputed in the backward when ``recompute`` (non-reentrant, the RNG
    state of drop path preserved: the same gradients)."""
    if not recompute or not torch.is_grad_enabled():
        return fn(*args)
    from torch.utils.checkpoint import checkpoint
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)

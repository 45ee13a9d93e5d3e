"""The ``minkowski`` backend: the encoder on MinkowskiEngine sparse tensors (optional).

The paper's release runs its sparse encoder on MinkowskiEngine. This backend does
the same with upstream MinkowskiEngine 0.5.4, as a second, independent sparse
convolution implementation to check ``sparse`` against:

- depthwise 7x7 conv: MinkowskiEngine's channelwise convolution (its kernel map,
  its accumulation), submanifold (output sites = input sites);
- 2x2 stride-2 downsample: ``MinkowskiConvolutionFunction``;
- GRN per sample through the batch index of each row (or over the batch, as the
  official ``MinkowskiGRN``), LayerNorm / Linear / GELU on the feature rows.

Parameters stay in the dense layout of :class:`SparseConvNeXtV2Encoder` (one state
dict for every backend); the kernels MinkowskiEngine wants are computed from them
on the fly, differentiably, with the converter's verified kernel-offset mapping.
Install: ``bash launch/install_minkowski.sh`` (docs/sparse_backends.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.convnextv2 import GRN, Block
from .compact import stem_rows
from .layout import SparseLayout
from .me_kernels import dense_conv_to_me, dense_depthwise_to_me
from .me_compat import INSTALL_HINT, import_minkowski

ME = import_minkowski()
from MinkowskiEngine.MinkowskiConvolution import MinkowskiConvolutionFunction  # noqa: E402
from MinkowskiEngine.MinkowskiSparseTensor import _get_coordinate_map_key  # noqa: E402
from MinkowskiEngineBackend._C import ConvolutionMode  # noqa: E402


def to_sparse_tensor(rows: torch.Tensor, layout: SparseLayout, stage: int) -> "ME.SparseTensor":
    """Rows at ``layout.stages[stage]`` -> a SparseTensor with pixel coordinates ``(b, y, x)``."""
    sites = layout.stages[stage]
    h, w = sites.size
    stride = 4 * 2 ** stage
    flat = sites.canvas_index
    y = (flat // w) % h
    x = flat % w
    coords = torch.stack([sites.sample_index, y * stride, x * stride], dim=1).int()
    if rows.is_cuda and not ME.is_cuda_available():
        raise RuntimeError(f"this MinkowskiEngine build is CPU-only; rebuild with CUDA ({INSTALL_HINT}) "
                           "or run the minkowski backend on the CPU")
    return ME.SparseTensor(rows, coordinates=coords, tensor_stride=stride,
                           quantization_mode=ME.SparseTensorQuantizationMode.UNWEIGHTED_SUM)


def channelwise_conv(x: "ME.SparseTensor", weight: torch.Tensor, bias: torch.Tensor | None) -> "ME.SparseTensor":
    """Depthwise ``k x k`` conv, stride 1, on the input's own sites: MinkowskiEngine's
    channelwise convolution with the kernel ``(k*k, C)`` derived from ``weight (C, 1, k, k)``."""
    kernel = dense_depthwise_to_me(weight)
    gen = ME.KernelGenerator(kernel_size=weight.shape[-1], stride=1, dilation=1, dimension=2)
    region_type, region_offset, _ = gen.get_kernel(x.tensor_stride, False)
    cm, key = x.coordinate_manager, x.coordinate_map_key
    kernel_map = cm.kernel_map(key, key, gen.kernel_stride, gen.kernel_size, gen.kernel_dilation,
                               region_type=region_type, region_offset=region_offset)
    out = x.F.new_zeros(x.F.shape)
    for k, in_out in kernel_map.items():
        in_out = in_out.long().to(x.F.device)
        out = out.index_add(0, in_out[1], x.F[in_out[0]] * kernel[k])
    if bias is not None:
        out = out + bias
    return ME.SparseTensor(out, coordinate_map_key=key, coordinate_manager=cm)


def strided_conv(x: "ME.SparseTensor", weight: torch.Tensor, bias: torch.Tensor) -> "ME.SparseTensor":
    """``k x k`` stride-``k`` conv (the downsample) with ``weight (C_out, C_in, k, k)``."""
    k = weight.shape[-1]
    gen = ME.KernelGenerator(kernel_size=k, stride=k, dilation=1, dimension=2)
    out_key = _get_coordinate_map_key(x, None, gen.expand_coordinates)
    feats = MinkowskiConvolutionFunction.apply(x.F, dense_conv_to_me(weight), gen, ConvolutionMode.DEFAULT,
                                               x.coordinate_map_key, out_key, x._manager)
    return ME.SparseTensor(feats + bias, coordinate_map_key=out_key, coordinate_manager=x._manager)


def with_features(x: "ME.SparseTensor", feats: torch.Tensor) -> "ME.SparseTensor":
    return ME.SparseTensor(feats, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)


def grn_features(grn: GRN, feats: torch.Tensor, batch_index: torch.Tensor, n: int, stats: str) -> torch.Tensor:
    """GRN with the L2 norm over each sample's rows (``sample``) or all rows (``batch``)."""
    if stats == "batch":
        gx = torch.linalg.vector_norm(feats, ord=2, dim=0, keepdim=True)
        nx = grn.normalizer(gx)
    else:
        sq = feats.new_zeros(n, feats.shape[1]).index_add(0, batch_index, feats * feats)
        nx = grn.normalizer(sq.sqrt()).index_select(0, batch_index)
    return grn.gamma.view(-1) * (feats * nx) + grn.beta.view(-1) + feats


def block_sparse(block: Block, x: "ME.SparseTensor", n: int, grn_stats: str) -> "ME.SparseTensor":
    batch_index = x.C[:, 0].long().to(x.F.device)
    y = channelwise_conv(x, block.dwconv.weight, block.dwconv.bias).F
    y = block.act(block.pwconv1(block.norm(y)))
    y = block.pwconv2(grn_features(block.grn, y, batch_index, n, grn_stats))
    scale = block.drop_path.sample_scale(n, y)
    if scale is not None:
        y = y * scale.index_select(0, batch_index)[:, None]
    return with_features(x, x.F + y)


def encoder_forward(encoder, imgs: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int],
                    visible_per_sample: int | None = None) -> torch.Tensor:
    """``(N, 3, H, W)`` + mask ``(N, L)`` -> ``(N, C_last, H/32, W/32)``, zeros at masked sites."""
    n = imgs.shape[0]
    layout = SparseLayout.from_mask(mask, grid, len(encoder.stages), visible_per_sample)
    x = to_sparse_tensor(stem_rows(encoder.downsample_layers[0], imgs, layout.stages[0]), layout, 0)
    for k, stage in enumerate(encoder.stages):
        if k > 0:
            norm, conv = encoder.downsample_layers[k]
            x = strided_conv(with_features(x, F.layer_norm(x.F, norm.normalized_shape, norm.weight, norm.bias,
                                                           norm.eps)), conv.weight, conv.bias)
        for block in stage:
            x = block_sparse(block, x, n, encoder.grn_stats)
    h, w = grid
    coords = x.C.long().to(x.F.device)
    flat = (coords[:, 0] * h + coords[:, 1] // 32) * w + coords[:, 2] // 32
    out = x.F.new_zeros(n * h * w, x.F.shape[1]).index_copy(0, flat, x.F)
    return out.view(n, h, w, -1).permute(0, 3, 1, 2).contiguous()

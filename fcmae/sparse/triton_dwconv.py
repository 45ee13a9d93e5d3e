"""Tile-wise submanifold depthwise conv in Triton: computes only active outputs from active inputs,
without the zero canvas of :func:`fcmae.sparse.compact.block_rows` (three passes over memory per
block, and 2.5x the arithmetic at mask 0.6). Rows and tiles as :mod:`fcmae.sparse.tiles` lays them
out. Forward, input grad (the same kernel with the taps reversed: the input and output sites are the
same set) and weight grad, accumulated in fp32 for any input dtype.

Registered as the custom ops ``fcmae::dwconv_tiles`` and ``fcmae::dwconv_tiles_wgrad`` (with fake
tensors and autograd), so ``torch.compile`` keeps the ops around them fused and calls these as they
are. Runs on CUDA; on the CPU only under ``TRITON_INTERPRET=1`` (the tests), which must be set
before this module is imported.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

from .tiles import StageTiles

WGRAD_CHUNKS = 64  # tile groups the weight grad is split over where no GPU says better (partial sums, then one sum)
WGRAD_PROGRAMS_PER_SM = 4  # the weight grad's grid: about this many programs for each SM, whatever the batch


@triton.jit
def _compact(s, LOG2T: tl.constexpr):
    """Z-order offset -> the coordinate in its even bits (bit 2b -> bit b)."""
    out = s * 0
    for b in tl.static_range(LOG2T):
        out += ((s >> (2 * b)) & 1) << b
    return out


@triton.jit
def _offsets(rows, C, WIDE: tl.constexpr):
    """Element offsets of rows of C channels: int32 where every offset fits (checked at launch)."""
    if WIDE:
        return rows.to(tl.int64) * C
    return rows * C


@triton.jit
def _dwconv_tiles_kernel(x_ptr, w_ptr, b_ptr, halo_ptr, y_ptr, C, TILE: tl.constexpr, LOG2T: tl.constexpr,
                         K: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_C: tl.constexpr,
                         WIDE: tl.constexpr):
    """One program per (tile, channel block). Each tap reads its input rows from the tile's halo table
    at a constant offset from the output site (``ky * H + kx``), so a tap costs a table read, a gather
    and the multiply-adds. Weights arrive in fp32 (rounded to the input dtype by the caller): no
    conversion in the loop. Element offsets are int32 unless the tensor needs more (``WIDE``): 64-bit
    offsets cost ~5 more instructions per site and tap."""
    p = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    s = tl.arange(0, TILE * TILE)
    H: tl.constexpr = TILE + K - 1
    site = halo_ptr + p.to(tl.int64) * (H * H) + _compact(s >> 1, LOG2T) * H + _compact(s, LOG2T)
    acc = tl.zeros([TILE * TILE, BLOCK_C], dtype=tl.float32)
    # A dynamic loop over kernel rows: unrolling all K * K taps keeps every tap's gather live at once
    # (register spills on sm_80/sm_90); one row of K taps at a time does not.
    for ky in range(K):
        for kx in tl.static_range(K):
            rows = tl.load(site + (ky * H + kx))
            ok = rows >= 0
            offset = _offsets(rows, C, WIDE)
            if EVEN_C:
                xv = tl.load(x_ptr + offset[:, None] + c[None, :], mask=ok[:, None], other=0.0)
                wv = tl.load(w_ptr + (ky * K + kx) * C + c)
            else:
                xv = tl.load(x_ptr + offset[:, None] + c[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
                wv = tl.load(w_ptr + (ky * K + kx) * C + c, mask=c_ok, other=0.0)
            acc += xv.to(tl.float32) * wv[None, :]
    if HAS_BIAS:  # added before the one rounding to the output dtype, as cuDNN does (two roundings
        # differ from it by a whole unit of the conv's value where the bias cancels it)
        acc += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    out_rows = p.to(tl.int64) * (TILE * TILE) + s
    tl.store(y_ptr + out_rows[:, None] * C + c[None, :], acc.to(y_ptr.dtype.element_ty), mask=c_ok[None, :])


@triton.jit
def _dwconv_tiles_wgrad_kernel(x_ptr, g_ptr, halo_ptr, out_ptr, P, C, CHUNKS, TILE: tl.constexpr,
                               LOG2T: tl.constexpr, K: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr,
                               WIDE: tl.constexpr):
    """One program per (chunk, channel block); a chunk is every CHUNKS-th group of GROUP consecutive
    tiles (GROUP * TILE^2 rows: small tiles are grouped so a warp's lanes have sites to work on). For
    each kernel row, the grad of a group is read and converted once and serves the row's 7 taps, whose
    products ``x[o + tap] * grad[o]`` accumulate in registers over every site of the chunk; each tap is
    summed over sites once, at the end of the row. Partial sums ``(CHUNKS, K * K, C)`` in fp32; the
    caller sums the chunks."""
    tl.static_assert(K == 7, "the weight grad keeps one accumulator per tap of a 7-tap kernel row")
    chunk = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    S: tl.constexpr = GROUP * TILE * TILE
    H: tl.constexpr = TILE + K - 1
    s = tl.arange(0, S)
    member = s >> (2 * LOG2T)  # which tile of the group
    local = s & (TILE * TILE - 1)
    site = member * (H * H) + _compact(local >> 1, LOG2T) * H + _compact(local, LOG2T)
    groups = tl.cdiv(P, GROUP)
    for ky in range(K):
        a0 = tl.zeros([S, BLOCK_C], dtype=tl.float32)
        a1 = tl.zeros([S, BLOCK_C], dtype=tl.float32)
        a2 = tl.zeros([S, BLOCK_C], dtype=tl.float32)
        a3 = tl.zeros([S, BLOCK_C], dtype=tl.float32)
        a4 = tl.zeros([S, BLOCK_C], dtype=tl.float32)
        a5 = tl.zeros([S, BLOCK_C], dtype=tl.float32)
        a6 = tl.zeros([S, BLOCK_C], dtype=tl.float32)
        for q in range(chunk, groups, CHUNKS):
            first = q * GROUP
            real = first + member < P
            g_rows = first * (TILE * TILE) + s
            gv = tl.load(g_ptr + _offsets(g_rows, C, WIDE)[:, None] + c[None, :], mask=real[:, None] & c_ok[None, :],
                         other=0.0).to(tl.float32)
            row_sites = halo_ptr + first.to(tl.int64) * (H * H) + site + ky * H
            for kx in tl.static_range(K):
                rows = tl.load(row_sites + kx, mask=real, other=-1)
                xv = tl.load(x_ptr + _offsets(rows, C, WIDE)[:, None] + c[None, :],
                             mask=(rows >= 0)[:, None] & c_ok[None, :], other=0.0)
                prod = xv.to(tl.float32) * gv
                if kx == 0:
                    a0 += prod
                elif kx == 1:
                    a1 += prod
                elif kx == 2:
                    a2 += prod
                elif kx == 3:
                    a3 += prod
                elif kx == 4:
                    a4 += prod
                elif kx == 5:
                    a5 += prod
                else:
                    a6 += prod
        out = out_ptr + (chunk * (K * K) + ky * K) * C + c
        tl.store(out, tl.sum(a0, axis=0), mask=c_ok)
        tl.store(out + C, tl.sum(a1, axis=0), mask=c_ok)
        tl.store(out + 2 * C, tl.sum(a2, axis=0), mask=c_ok)
        tl.store(out + 3 * C, tl.sum(a3, axis=0), mask=c_ok)
        tl.store(out + 4 * C, tl.sum(a4, axis=0), mask=c_ok)
        tl.store(out + 5 * C, tl.sum(a5, axis=0), mask=c_ok)
        tl.store(out + 6 * C, tl.sum(a6, axis=0), mask=c_ok)


# Launch settings chosen from `ptxas -v` on sm_80 and sm_90 (benchmarks/kernel_resources.py; the
# compile check in tests/test_kernel_resources.py keeps every configuration free of spills) and the
# instruction counts of benchmarks/kernel_cost.py.
# The forward (and input grad) on 4 warps: with the halo table it no longer spills at 4 (up to 178
# registers at 32 values a thread), and 8 warps issued 10% more per output at tile 8 and spilled on sm_80
# at atto's stage 0 (ptxas held 8 warps to 80 registers).
NUM_WARPS = 4


WGRAD_NUM_WARPS = 4
# each of the weight grad's 7 accumulators (one per tap of a kernel row): sites x BLOCK_C, 8 fp32 values a
# thread at 4 warps; at 16 (2,048 values) ptxas needed 168 registers and spilled 4-8 bytes on sm_80 and sm_90
WGRAD_VALUES = 1024
WGRAD_SITES = 64  # rows of one weight-grad step: tiles under 8x8 are grouped up to this many sites
# rows a weight-grad chunk reads at least: its (49, C) fp32 partial sums then stay under 1/4 of the bf16
# x and grad it reads (at stage 3 of base, batch 128, 528 chunks wrote 106 MB of partials for 10 MB of data)
WGRAD_MIN_ROWS = 196


def _block_c(channels: int, sites: int) -> int:
    # about 4K accumulators a program: wide channel blocks for small tiles
    return max(16, min(triton.next_power_of_2(channels), 4096 // sites))


def wgrad_group(tile: int) -> int:
    """Tiles a weight-grad step covers: ``WGRAD_SITES`` rows, so a 1x1 tile does not leave lanes idle."""
    return max(1, WGRAD_SITES // (tile * tile))


def _wgrad_block_c(channels: int, sites: int) -> int:
    # sites: the rows of one step (wgrad_group(tile) * tile^2); the channel block fills the accumulator.
    # Narrow blocks make programs enough for every SM where the chunks are few (the partial-sum bound).
    return max(16, min(triton.next_power_of_2(channels), WGRAD_VALUES // sites))


def _wide(x: torch.Tensor) -> bool:
    """Whether element offsets into ``x`` (and a row of -1 times C) need 64 bits."""
    return x.numel() + x.shape[-1] >= 2**31


def _taps(weight_rows: int) -> int:
    return int(round(weight_rows ** 0.5))


@torch.library.custom_op("fcmae::dwconv_tiles", mutates_args=())
def dwconv_tiles(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], halo: torch.Tensor,
                 tile: int) -> torch.Tensor:
    """``(R, C)`` active rows -> ``(R, C)``: the ``k x k`` depthwise conv plus ``bias`` (``(C,)`` or None)
    at the active sites, inactive inputs as zero. ``weight``: ``(k * k, C)``, taps row-major, used in
    fp32 (round it to the input dtype first to match a conv in that dtype); ``halo``: the tiles' halo
    table (:func:`fcmae.sparse.tiles.halo_table`)."""
    _check_shapes(x, weight, halo, tile)
    torch._check(bias is None or bias.shape == (x.shape[1],), lambda: f"bias {tuple(bias.shape)} for {x.shape[1]} channels")
    x, weight = x.contiguous(), weight.contiguous().float()
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel() == 0:
        return y
    channels, sites = x.shape[1], tile * tile
    block_c = _block_c(channels, sites)
    grid = (halo.shape[0], triton.cdiv(channels, block_c))
    has_bias = bias is not None
    _dwconv_tiles_kernel[grid](x, weight, bias.contiguous() if has_bias else weight, halo, y, channels,
                               TILE=tile, LOG2T=tile.bit_length() - 1, K=_taps(weight.shape[0]), BLOCK_C=block_c,
                                     HAS_BIAS=has_bias, EVEN_C=channels % block_c == 0, WIDE=_wide(x),
                               num_warps=NUM_WARPS)
    return y


def _check_shapes(x, weight, halo, tile: int) -> None:
    """What the kernels index by: a mismatch would read or write out of bounds, so refuse it."""
    k = _taps(weight.shape[0])
    torch._check(x.dim() == 2 and weight.dim() == 2, lambda: "x (R, C) and weight (k * k, C) expected")
    torch._check(k * k == weight.shape[0] and k % 2 == 1, lambda: f"weight has {weight.shape[0]} taps, not an odd k * k")
    torch._check(weight.shape[1] == x.shape[1], lambda: f"weight has {weight.shape[1]} channels, x {x.shape[1]}")
    _check_halo(x, halo, tile, k)


def _check_halo(x, halo, tile: int, k: int) -> None:
    torch._check(tile >= 1 and tile & (tile - 1) == 0, lambda: f"tile {tile} is not a power of two")
    torch._check(halo.dim() == 2 and halo.shape[1] == (tile + k - 1) ** 2,
                 lambda: f"halo table {tuple(halo.shape)} for {tile}x{tile} tiles and a {k}x{k} kernel")
    torch._check(halo.dtype == torch.int32, lambda: f"halo table of {halo.dtype}, not int32")
    torch._check(x.shape[0] == halo.shape[0] * tile * tile,
                 lambda: f"x has {x.shape[0]} rows, the tiles {halo.shape[0]} x {tile * tile}")


@dwconv_tiles.register_fake
def _dwconv_tiles_fake(x, weight, bias, halo, tile):
    _check_shapes(x, weight, halo, tile)
    return torch.empty_like(x, memory_format=torch.contiguous_format)  # as the real op: contiguous


@torch.library.custom_op("fcmae::dwconv_tiles_wgrad", mutates_args=())
def dwconv_tiles_wgrad(x: torch.Tensor, grad: torch.Tensor, halo: torch.Tensor, tile: int, taps: int) -> torch.Tensor:
    """The weight grad ``(taps, C)`` in fp32: ``sum over active outputs o of grad[o] * x[o + tap]``."""
    torch._check(grad.shape == x.shape, lambda: f"grad {tuple(grad.shape)} vs x {tuple(x.shape)}")
    _check_halo(x, halo, tile, _taps(taps))
    x, grad = x.contiguous(), grad.contiguous()
    channels, tiles = x.shape[1], halo.shape[0]
    if not tiles:
        return torch.zeros(taps, channels, device=x.device, dtype=torch.float32)
    plan = wgrad_plan(tiles, channels, tile, x.device)
    partial = torch.empty(plan.chunks, taps, channels, device=x.device, dtype=torch.float32)  # every entry written
    grid = (plan.chunks, triton.cdiv(channels, plan.block_c))
    _dwconv_tiles_wgrad_kernel[grid](x, grad, halo, partial, tiles, channels, plan.chunks, TILE=tile,
                                     LOG2T=tile.bit_length() - 1, K=_taps(taps), BLOCK_C=plan.block_c,
                                     GROUP=plan.group, WIDE=_wide(x), num_warps=WGRAD_NUM_WARPS)
    return partial.sum(0)


class WgradPlan(NamedTuple):
    group: int  # tiles a step covers
    block_c: int  # channels a program covers
    chunks: int  # programs per channel block, each summing every chunks-th group
    groups: int  # groups of tiles in all


def wgrad_plan(tiles: int, channels: int, tile: int, device: torch.device, sms: int | None = None) -> WgradPlan:
    """The weight grad's launch: enough programs to fill every SM a few times over (they are
    independent), at most one chunk per group of tiles, and chunks of at least ``WGRAD_MIN_ROWS`` rows
    (the partial-sum bound). ``sms``: the GPU's SM count (asked of ``device`` when None); without a GPU,
    ``WGRAD_CHUNKS`` chunks at most."""
    group = wgrad_group(tile)
    block_c = _wgrad_block_c(channels, group * tile * tile)
    if device.type == "cuda":
        sms = sms or torch.cuda.get_device_properties(device).multi_processor_count
        wanted = -(-WGRAD_PROGRAMS_PER_SM * sms // triton.cdiv(channels, block_c))
    else:
        wanted = WGRAD_CHUNKS
    groups = -(-tiles // group)
    chunks = max(1, min(wanted, tiles * tile * tile // WGRAD_MIN_ROWS, groups))
    return WgradPlan(group, block_c, chunks, groups)


@dwconv_tiles_wgrad.register_fake
def _dwconv_tiles_wgrad_fake(x, grad, halo, tile, taps):
    return x.new_empty(taps, x.shape[1], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, bias, halo, tile = inputs
    ctx.save_for_backward(x, weight, halo)
    ctx.tile = tile
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    x, weight, halo = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        # the transpose of a submanifold conv on one site set is the conv with the taps reversed
        grad_x = dwconv_tiles(grad, weight.flip(0), None, halo, ctx.tile)
    if ctx.needs_input_grad[1]:
        grad_w = dwconv_tiles_wgrad(x, grad, halo, ctx.tile, weight.shape[0]).to(weight.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        grad_b = grad.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_b, None, None


dwconv_tiles.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.fcmae.dwconv_tiles)
def _dwconv_tiles_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """A multiply and an add per tap, channel and active site (torch.utils.flop_counter)."""
    return 2 * x_shape[0] * x_shape[1] * w_shape[0]


def depthwise_conv_tiles(x: torch.Tensor, conv: torch.nn.Conv2d, tiles: StageTiles) -> torch.Tensor:
    """``conv`` (depthwise, odd square kernel, stride 1, 'same' padding) on ``(R, C)`` active rows,
    in the autocast dtype where autocast is on (a LayerNorm before it returns fp32 under CUDA
    autocast, and the canvas path's conv would run in the autocast dtype), accumulated in fp32."""
    c, _, k, _ = conv.weight.shape
    if x.is_floating_point() and _autocast_dtype(x.device.type) is not None:
        x = x.to(_autocast_dtype(x.device.type))
    # the weight rounded to x's dtype, as a conv in that dtype uses it, then held in fp32 for the kernel
    weight = conv.weight.view(c, k * k).t().to(x.dtype).float()
    bias = None if conv.bias is None else conv.bias.to(x.dtype)
    return dwconv_tiles(x, weight, bias, tiles.halo, tiles.tile)


def _autocast_dtype(device_type: str):
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except TypeError:  # an older torch without the device-type argument
        return None
    return None


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

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

from .tiles import StageTiles

WGRAD_CHUNKS = 64  # tile groups the weight grad is split over where no GPU says better (partial sums, then one sum)
WGRAD_PROGRAMS_PER_SM = 4  # the weight grad's grid: about this many programs for each SM, whatever the batch


@triton.jit
def _spread(v, LOG2T: tl.constexpr):
    """Local coordinate bits -> their positions in a Z-order offset (bit b -> bit 2b)."""
    out = v * 0
    for b in tl.static_range(LOG2T):
        out += ((v >> b) & 1) << (2 * b)
    return out


@triton.jit
def _compact(s, LOG2T: tl.constexpr):
    """Z-order offset -> the coordinate in its even bits (bit 2b -> bit b)."""
    out = s * 0
    for b in tl.static_range(LOG2T):
        out += ((s >> (2 * b)) & 1) << b
    return out


@triton.jit
def _neighbour_rows(nbr_ptr, p, ly, lx, dy, dx, TILE: tl.constexpr, LOG2T: tl.constexpr, REACH: tl.constexpr):
    """Row of the input site ``(ly + dy, lx + dx)`` (tile-local coordinates of tile ``p``) and whether
    it is active; ``dy, dx`` in ``[-reach * t, reach * t]``."""
    NB: tl.constexpr = 2 * REACH + 1
    iy = ly + dy + REACH * TILE  # shifted to be >= 0, so shifts floor
    ix = lx + dx + REACH * TILE
    ty = iy >> LOG2T
    tx = ix >> LOG2T
    nb = tl.load(nbr_ptr + p * (NB * NB) + ty * NB + tx)
    local = (_spread(iy - (ty << LOG2T), LOG2T) << 1) | _spread(ix - (tx << LOG2T), LOG2T)
    return nb.to(tl.int64) * (TILE * TILE) + local, nb >= 0


@triton.jit
def _dwconv_tiles_kernel(x_ptr, w_ptr, b_ptr, nbr_ptr, y_ptr, C, TILE: tl.constexpr, LOG2T: tl.constexpr,
                         REACH: tl.constexpr, K: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr):
    p = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    s = tl.arange(0, TILE * TILE)
    ly = _compact(s >> 1, LOG2T)
    lx = _compact(s, LOG2T)
    acc = tl.zeros([TILE * TILE, BLOCK_C], dtype=tl.float32)
    # A dynamic loop over kernel rows: unrolling all K * K taps keeps every tap's gather live at once
    # (tens of KB of register spills per thread on sm_80/sm_90); one row of K taps at a time does not.
    for ky in range(K):
        for kx in tl.static_range(K):
            rows, active = _neighbour_rows(nbr_ptr, p, ly, lx, ky - K // 2, kx - K // 2, TILE, LOG2T, REACH)
            xv = tl.load(x_ptr + rows[:, None] * C + c[None, :], mask=active[:, None] & c_ok[None, :], other=0.0)
            wv = tl.load(w_ptr + (ky * K + kx) * C + c, mask=c_ok, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    if HAS_BIAS:  # added before the one rounding to the output dtype, as cuDNN does (two roundings
        # differ from it by a whole unit of the conv's value where the bias cancels it)
        acc += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    out_rows = p.to(tl.int64) * (TILE * TILE) + s
    tl.store(y_ptr + out_rows[:, None] * C + c[None, :], acc.to(y_ptr.dtype.element_ty), mask=c_ok[None, :])


@triton.jit
def _dwconv_tiles_wgrad_kernel(x_ptr, g_ptr, nbr_ptr, out_ptr, P, C, CHUNKS, TILE: tl.constexpr,
                               LOG2T: tl.constexpr, REACH: tl.constexpr, K: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program per (tile chunk, channel block): for each tap, ``x[o + tap] * grad[o]`` accumulates in
    registers over every site of every tile of the chunk and is summed over sites once, at the end of
    the tap. The tap's address arithmetic (which neighbour tile, which site in it) does not change
    from tile to tile, so it stays out of the inner loop; only the neighbour's index is read per tile.
    Partial sums ``(CHUNKS, K * K, C)`` in fp32; the caller sums the chunks."""
    chunk = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    s = tl.arange(0, TILE * TILE)
    ly = _compact(s >> 1, LOG2T)
    lx = _compact(s, LOG2T)
    NB: tl.constexpr = 2 * REACH + 1
    for tap in range(K * K):
        iy = ly + tap // K - K // 2 + REACH * TILE  # shifted to be >= 0, so shifts floor
        ix = lx + tap % K - K // 2 + REACH * TILE
        ty = iy >> LOG2T
        tx = ix >> LOG2T
        local = (_spread(iy - (ty << LOG2T), LOG2T) << 1) | _spread(ix - (tx << LOG2T), LOG2T)
        slot = ty * NB + tx
        acc = tl.zeros([TILE * TILE, BLOCK_C], dtype=tl.float32)
        for p in range(chunk, P, CHUNKS):
            g_rows = s.to(tl.int64) + p * (TILE * TILE)
            gv = tl.load(g_ptr + g_rows[:, None] * C + c[None, :], mask=c_ok[None, :], other=0.0)
            nb = tl.load(nbr_ptr + p * (NB * NB) + slot)
            rows = nb.to(tl.int64) * (TILE * TILE) + local
            xv = tl.load(x_ptr + rows[:, None] * C + c[None, :], mask=(nb >= 0)[:, None] & c_ok[None, :], other=0.0)
            acc += xv.to(tl.float32) * gv.to(tl.float32)
        tl.store(out_ptr + (chunk * (K * K) + tap) * C + c, tl.sum(acc, axis=0), mask=c_ok)


# Launch settings chosen from `ptxas -v` on sm_80 and sm_90 (benchmarks/kernel_resources.py; the
# compile check in tests/test_kernel_resources.py keeps every configuration free of spills).
NUM_WARPS = 8  # the forward (and input grad): 4 warps spill at tile 8 and at wide channel blocks
SMALL_NUM_WARPS = 4  # ... but at 8 warps ptxas caps a 2,048-value accumulator at 80 registers and spills


def forward_warps(sites: int, block_c: int) -> int:
    """Warps of the forward: 8 for accumulators over 2,048 values, else 4 (16+ values a thread)."""
    return NUM_WARPS if sites * block_c > 2048 else SMALL_NUM_WARPS
WGRAD_NUM_WARPS = 4
WGRAD_VALUES = 2048  # the weight grad's accumulator: sites x BLOCK_C, 16 fp32 values a thread at 4 warps


def _block_c(channels: int, sites: int) -> int:
    # about 4K accumulators a program: wide channel blocks for small tiles
    return max(16, min(triton.next_power_of_2(channels), 4096 // sites))


def _wgrad_block_c(channels: int, sites: int) -> int:
    # a tile of 1 site with 64 channels left half of 128 threads idle: wide channel blocks for small tiles
    return max(16, min(triton.next_power_of_2(channels), WGRAD_VALUES // sites))


@torch.library.custom_op("fcmae::dwconv_tiles", mutates_args=())
def dwconv_tiles(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], neighbours: torch.Tensor,
                 tile: int, reach: int) -> torch.Tensor:
    """``(R, C)`` active rows -> ``(R, C)``: the ``k x k`` depthwise conv plus ``bias`` (``(C,)`` or None)
    at the active sites, inactive inputs as zero. ``weight``: ``(k * k, C)``, taps row-major."""
    _check_shapes(x, weight, neighbours, tile, reach)
    torch._check(bias is None or bias.shape == (x.shape[1],), lambda: f"bias {tuple(bias.shape)} for {x.shape[1]} channels")
    x, weight = x.contiguous(), weight.contiguous()
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel() == 0:
        return y
    channels, sites = x.shape[1], tile * tile
    block_c = _block_c(channels, sites)
    grid = (neighbours.shape[0], triton.cdiv(channels, block_c))
    has_bias = bias is not None
    _dwconv_tiles_kernel[grid](x, weight, bias.contiguous() if has_bias else weight, neighbours, y, channels,
                               TILE=tile, LOG2T=tile.bit_length() - 1, REACH=reach,
                               K=int(round(weight.shape[0] ** 0.5)), BLOCK_C=block_c, HAS_BIAS=has_bias,
                               num_warps=forward_warps(sites, block_c))
    return y


def _check_shapes(x, weight, neighbours, tile: int, reach: int) -> None:
    """What the kernels index by: a mismatch would read or write out of bounds, so refuse it."""
    k = int(round(weight.shape[0] ** 0.5))
    torch._check(x.dim() == 2 and weight.dim() == 2, lambda: "x (R, C) and weight (k * k, C) expected")
    torch._check(k * k == weight.shape[0] and k % 2 == 1, lambda: f"weight has {weight.shape[0]} taps, not an odd k * k")
    torch._check(weight.shape[1] == x.shape[1], lambda: f"weight has {weight.shape[1]} channels, x {x.shape[1]}")
    torch._check(tile >= 1 and tile & (tile - 1) == 0, lambda: f"tile {tile} is not a power of two")
    torch._check(neighbours.dim() == 2 and neighbours.shape[1] == (2 * reach + 1) ** 2,
                 lambda: f"neighbours {tuple(neighbours.shape)} for reach {reach}")
    torch._check(x.shape[0] == neighbours.shape[0] * tile * tile,
                 lambda: f"x has {x.shape[0]} rows, the tiles {neighbours.shape[0]} x {tile * tile}")
    torch._check(reach * tile >= k // 2, lambda: f"reach {reach} x tile {tile} does not cover a {k}x{k} kernel")


@dwconv_tiles.register_fake
def _dwconv_tiles_fake(x, weight, bias, neighbours, tile, reach):
    _check_shapes(x, weight, neighbours, tile, reach)
    return torch.empty_like(x, memory_format=torch.contiguous_format)  # as the real op: contiguous


@torch.library.custom_op("fcmae::dwconv_tiles_wgrad", mutates_args=())
def dwconv_tiles_wgrad(x: torch.Tensor, grad: torch.Tensor, neighbours: torch.Tensor, tile: int, reach: int,
                       taps: int) -> torch.Tensor:
    """The weight grad ``(taps, C)`` in fp32: ``sum over active outputs o of grad[o] * x[o + tap]``."""
    torch._check(grad.shape == x.shape, lambda: f"grad {tuple(grad.shape)} vs x {tuple(x.shape)}")
    torch._check(x.shape[0] == neighbours.shape[0] * tile * tile,
                 lambda: f"x has {x.shape[0]} rows, the tiles {neighbours.shape[0]} x {tile * tile}")
    x, grad = x.contiguous(), grad.contiguous()
    channels, tiles = x.shape[1], neighbours.shape[0]
    if not tiles:
        return torch.zeros(taps, channels, device=x.device, dtype=torch.float32)
    block_c = _wgrad_block_c(channels, tile * tile)
    chunks = wgrad_chunks(tiles, triton.cdiv(channels, block_c), x.device)
    partial = torch.empty(chunks, taps, channels, device=x.device, dtype=torch.float32)  # every entry written
    grid = (chunks, triton.cdiv(channels, block_c))
    _dwconv_tiles_wgrad_kernel[grid](x, grad, neighbours, partial, tiles, channels, chunks, TILE=tile,
                                     LOG2T=tile.bit_length() - 1, REACH=reach, K=int(round(taps ** 0.5)),
                                     BLOCK_C=block_c, num_warps=WGRAD_NUM_WARPS)
    return partial.sum(0)


def wgrad_chunks(tiles: int, channel_blocks: int, device: torch.device) -> int:
    """Tile chunks of the weight grad: enough programs to fill every SM a few times over (its programs
    are independent), at most one chunk per tile. Without a GPU to ask, WGRAD_CHUNKS."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        wanted = -(-WGRAD_PROGRAMS_PER_SM * sms // channel_blocks)
    else:
        wanted = WGRAD_CHUNKS
    return max(1, min(wanted, tiles))


@dwconv_tiles_wgrad.register_fake
def _dwconv_tiles_wgrad_fake(x, grad, neighbours, tile, reach, taps):
    return x.new_empty(taps, x.shape[1], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, bias, neighbours, tile, reach = inputs
    ctx.save_for_backward(x, weight, neighbours)
    ctx.tile, ctx.reach = tile, reach
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    x, weight, neighbours = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        # the transpose of a submanifold conv on one site set is the conv with the taps reversed
        grad_x = dwconv_tiles(grad, weight.flip(0), None, neighbours, ctx.tile, ctx.reach)
    if ctx.needs_input_grad[1]:
        grad_w = dwconv_tiles_wgrad(x, grad, neighbours, ctx.tile, ctx.reach, weight.shape[0]).to(weight.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
        grad_b = grad.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_b, None, None, None


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
    weight = conv.weight.view(c, k * k).t().to(x.dtype)
    bias = None if conv.bias is None else conv.bias.to(x.dtype)
    return dwconv_tiles(x, weight, bias, tiles.neighbours, tiles.tile, tiles.reach)


def _autocast_dtype(device_type: str):
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except TypeError:  # an older torch without the device-type argument
        return None
    return None


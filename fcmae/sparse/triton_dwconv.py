"""Tile-wise submanifold depthwise conv in Triton: computes only active outputs from active inputs,
without the zero canvas of :func:`fcmae.sparse.compact.block_rows` (three passes over memory per
block, and 2.5x the arithmetic at mask 0.6). Rows and tiles as :mod:`fcmae.sparse.tiles` lays them
out. Forward, input grad (the same kernel with the taps reversed: the input and output sites are the
same set) and weight grad, accumulated in fp32 for any input dtype. The kernels' code is generated per
tile side (:mod:`fcmae.sparse.row_kernels`: one tile row a program, at 2x2 tiles one tile, each input
read once per halo row, masked sites read as zeros without a memory access); this module launches them.

Registered as the custom ops ``fcmae::dwconv_tiles`` and ``fcmae::dwconv_tiles_wgrad`` (with fake
tensors and autograd), so ``torch.compile`` keeps the ops around them fused and calls these as they
are. Runs on CUDA; on the CPU only under ``TRITON_INTERPRET=1`` (the tests), which must be set
before this module is imported.
"""
from __future__ import annotations

import functools
import hashlib
import linecache
import sys
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch.utils.flop_counter import register_flop_formula

from .row_kernels import WHOLE_TILE_AT, Variant, forward_source, rows_a_program, words
from .tiles import StageTiles
from .wgrad_kernels import HALO_ROW_AT, wgrad_source

# The weight grad's grid where no GPU says better (the interpreter): this many chunks at most.
WGRAD_CHUNKS = 64
WGRAD_PROGRAMS_PER_SM = 4  # the weight grad's grid: about this many programs for each SM, whatever the batch
# sites a weight-grad chunk covers at least: its (k * k, C) fp32 partial sums then stay within the bf16 x
# and grad it reads (the sum over chunks reads them again). 98 (half) left stage 3 of base at b128 24 chunks
# for 528 places: 102 trips a program, latency-bound at 33.5 us a block; 49 chunks model 17.4 (#49)
WGRAD_MIN_SITES = 49
MAX_BLOCK_C = 1024  # channels a program covers at most: 8 a thread on 4 warps in bf16


def launch_shape(channels: int, pairs: bool, tile: int = 1, forward: bool = False) -> tuple[int, int]:
    """``(BLOCK_C, num_warps)`` of a kernel (the weight grad's, or with ``forward`` the forward's): one
    channel block for the whole width where it fits, 8 channels a thread in 16-bit dtypes (one 16-byte
    load a site) and 4 in fp32, so a site's index read and a trip's barrier are shared by as many values as
    a thread can hold; half that at 8x8 tiles, whose 8 outputs, 14 sites in flight and two kernel rows of
    weights would not fit 255 registers at 8, and in the forward at the tile sides of
    ``row_kernels.WHOLE_TILE_AT`` (four outputs, two widened halo rows and two kernel rows of weights: 254
    registers at 8), there on up to 8 warps (chosen from the SASS counts of benchmarks/kernel_cost.py;
    tests/sparse/test_kernel_resources.py keeps every launch free of spills)."""
    block_c = max(32, min(triton.next_power_of_2(channels), MAX_BLOCK_C))
    whole = forward and tile in WHOLE_TILE_AT
    per_thread = (8 if pairs else 4) // (2 if tile >= 8 or whole else 1)
    return block_c, max(1, min(8 if whole else 4, block_c // (32 * per_thread)))


def _wide(x: torch.Tensor) -> bool:
    """Whether element offsets into ``x`` (and a row of -1 times C) need 64 bits."""
    return x.numel() + x.shape[-1] >= 2**31


def _pairs(x: torch.Tensor) -> bool:
    """bf16 rows of an even width are read as 32-bit words of two channels (row_kernels.py)."""
    return x.dtype == torch.bfloat16 and x.shape[1] % 2 == 0


def _taps(weight_rows: int) -> int:
    return int(round(weight_rows ** 0.5))


@functools.lru_cache(maxsize=None)
def kernel(v: Variant):
    """The ``triton.jit`` function for ``v``, compiled from its generated source (the forward's from
    :mod:`.row_kernels`, the weight grad's from :mod:`.wgrad_kernels`). The source is registered with
    :mod:`linecache` under a name that carries its hash, so ``inspect`` (which Triton reads a kernel's
    source with), tracebacks and the interpreter all see it; nothing is written to disk."""
    text = forward_source(v) if v.kernel == "forward" else wgrad_source(v)
    name = f"<fcmae-{v.kernel}-t{v.tile}-k{v.k}{'-pairs' if v.pairs else ''}{'-wide' if v.wide else ''}-" \
           f"{hashlib.sha1(text.encode()).hexdigest()[:12]}>"
    linecache.cache[name] = (len(text), None, text.splitlines(True), name)  # mtime None: never evicted
    namespace: dict = {"__name__": f"fcmae_generated_{v.kernel}_t{v.tile}"}
    exec(compile(text, name, "exec"), namespace)
    return namespace[v.kernel]


@torch.library.custom_op("fcmae::dwconv_tiles", mutates_args=())
def dwconv_tiles(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], halo: torch.Tensor,
                 tile: int, flip: bool = False) -> torch.Tensor:
    """``(R, C)`` active rows -> ``(R, C)``: the ``k x k`` depthwise conv plus ``bias`` (``(C,)`` or None)
    at the active sites, inactive inputs as zero. ``weight``: ``(k * k, C)``, taps row-major, used in
    fp32 (round it to the input dtype first to match a conv in that dtype: its ``(k * k, C)`` copy is made
    anyway, and rounds for free); ``bias``: rounded to the input dtype here, as a conv in that dtype adds
    it (its grad is the fp32 sum of the grads, straight through the rounding); ``halo``: the tiles' halo
    table (:func:`fcmae.sparse.tiles.halo_table`); ``flip``: use the taps reversed (the input grad's conv,
    without a reversed copy of the weights)."""
    _check_shapes(x, weight, halo, tile)
    torch._check(bias is None or bias.shape == (x.shape[1],), lambda: f"bias {tuple(bias.shape)} for {x.shape[1]} channels")
    x = x.contiguous()
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel() == 0:
        return y
    # the weights and bias are read as they are (fp32, channels in their order: no reordered copy a launch)
    channels, k, pairs = x.shape[1], _taps(weight.shape[0]), _pairs(x)
    weight = weight.float().contiguous()  # no copy for the fp32 (taps, C) weights the encoder hands over
    bias32 = bias.float().contiguous() if bias is not None else weight
    block_c, warps = launch_shape(channels, pairs, tile, forward=True)
    # one program per tile row (or whole tile, row_kernels.WHOLE_TILE_AT) and channel block
    grid = (halo.shape[0] * tile // rows_a_program(tile), triton.cdiv(channels, block_c))
    kernel(Variant("forward", tile, k, pairs, _wide(x)))[grid](
        x, weight, bias32, halo, y, C=channels, C2=words(channels, pairs), BLOCK_C=block_c,
        HAS_BIAS=bias is not None, EVEN_C=channels % block_c == 0, FLIP=flip, num_warps=warps)
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
def _dwconv_tiles_fake(x, weight, bias, halo, tile, flip=False):
    _check_shapes(x, weight, halo, tile)
    return torch.empty_like(x, memory_format=torch.contiguous_format)  # as the real op: contiguous


@torch.library.custom_op("fcmae::dwconv_tiles_wgrad", mutates_args=())
def dwconv_tiles_wgrad(x: torch.Tensor, grad: torch.Tensor, halo: torch.Tensor, tile: int,
                       taps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight grad, ``(C, taps)`` in fp32 as a depthwise conv's weight ``(C, 1, k, k)`` lays it out
    (``[c, tap]`` is ``sum over active outputs o of grad[o, c] * x[o + tap, c]``), and the bias grad
    ``(C,)``, ``sum over o of grad[o]``: both from one pass over the grads, and the partial sums of the
    pass summed and laid out by one small launch, so nothing copies them again on their way to the
    parameters."""
    torch._check(grad.shape == x.shape, lambda: f"grad {tuple(grad.shape)} vs x {tuple(x.shape)}")
    _check_halo(x, halo, tile, _taps(taps))
    x, grad = x.contiguous(), grad.contiguous()
    channels, tiles, k, pairs = x.shape[1], halo.shape[0], _taps(taps), _pairs(x) and _pairs(grad)
    if not tiles:
        return (torch.zeros(channels, taps, device=x.device, dtype=torch.float32),
                torch.zeros(channels, device=x.device, dtype=torch.float32))
    variant = Variant("wgrad", tile, k, pairs, _wide(x))
    plan = wgrad_plan(tiles, channels, tile, x.device, pairs=pairs, k=k,
                      resident=_RESIDENT.get((variant, channels)))
    # every value written once (a halo row a program: t slots a chunk, wgrad_kernels.halo_row_source)
    partial = torch.empty(plan.chunks * plan.slots, taps + 1, channels, device=x.device, dtype=torch.float32)
    grid = (plan.chunks, plan.axis, triton.cdiv(channels, plan.block_c))
    launched = kernel(variant)[grid](
        x, grad, halo, partial, plan.rows, plan.chunks, C=channels, C2=words(channels, pairs),
        BLOCK_C=plan.block_c, EVEN_C=channels % plan.block_c == 0, num_warps=plan.warps)
    _remember_occupancy(variant, channels, launched, plan.warps, x.device)
    return sum_partials(partial)


SUM_BLOCK, SUM_CHUNKS = 128, 32  # the sum's program: 128 values of a partial row, 32 chunks a step


@triton.jit
def _sum_partials(partial_ptr, w_ptr, b_ptr, CHUNKS, N, C, TAPS: tl.constexpr, BLOCK: tl.constexpr,
                  STEP: tl.constexpr):
    """``partial (CHUNKS, TAPS + 1, C)`` summed over chunks, ``STEP`` chunks of a block loaded at once (a
    chain of one load a chunk would wait on memory once a chunk), each sum in a fixed order (deterministic);
    written as the parameters lay them out: the weight grad ``(C, TAPS)``, the bias grad ``(C,)``."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat indices of a (TAPS + 1, C) partial
    ok = i < N
    acc = tl.zeros([STEP, BLOCK], dtype=tl.float32)
    for start in range(0, CHUNKS, STEP):
        chunk = start + tl.arange(0, STEP)
        acc += tl.load(partial_ptr + chunk[:, None].to(tl.int64) * N + i[None, :],
                       mask=(chunk[:, None] < CHUNKS) & ok[None, :], other=0.0)
    total = tl.sum(acc, axis=0)
    tap = i // C
    c = i - tap * C
    tl.store(w_ptr + c * TAPS + tap, total, mask=ok & (tap < TAPS))
    tl.store(b_ptr + c, total, mask=ok & (tap == TAPS))


def sum_partials(partial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight grad's partial sums ``(chunks, taps + 1, C)`` -> ``((C, taps), (C,))``, one launch."""
    chunks, rows, channels = partial.shape
    weight = torch.empty(channels, rows - 1, device=partial.device, dtype=torch.float32)
    bias = torch.empty(channels, device=partial.device, dtype=torch.float32)
    n = rows * channels
    _sum_partials[(triton.cdiv(n, SUM_BLOCK),)](partial, weight, bias, chunks, n, channels, TAPS=rows - 1,
                                                BLOCK=SUM_BLOCK, STEP=SUM_CHUNKS)
    return weight, bias


# programs of a weight-grad binary one SM holds at once, from its register count as the driver loaded it
# (known after its first launch on a GPU; sizes the grid of the next ones)
_RESIDENT: dict[tuple[Variant, int], int] = {}


def resident_programs(registers: int, warps: int) -> int:
    """Programs of ``warps`` warps at ``registers`` a thread that one SM (H100/A100: 64K registers, 64
    warps, 32 programs) holds at once; registers are allocated 8 a thread at a time (a warp's 256)."""
    per_warp = -(-registers // 8) * 8 * 32
    return max(1, min(65536 // (per_warp * warps), 64 // warps, 32))


def _remember_occupancy(variant: Variant, channels: int, launched, warps: int, device: torch.device) -> None:
    registers = getattr(launched, "n_regs", None)
    if device.type == "cuda" and isinstance(registers, int) and registers > 0:
        _RESIDENT[(variant, channels)] = resident_programs(registers, warps)


class WgradPlan(NamedTuple):
    block_c: int  # channels a program covers
    warps: int
    chunks: int  # programs per kernel (or halo) row and channel block, each summing every chunks-th unit
    rows: int  # the units a program's trips walk, in all: tile rows (tiles x tile side), or tiles
    axis: int = 7  # the grid's second axis: kernel rows (k), or halo rows (tile + k - 1)
    slots: int = 1  # partial sums a chunk writes: 1, or the tile side (a halo row a program)


def wgrad_plan(tiles: int, channels: int, tile: int, device: torch.device, sms: int | None = None,
               pairs: bool = True, k: int = 7, resident: int | None = None) -> WgradPlan:
    """The weight grad's launch: ``chunks x k`` (kernel rows; halo rows, ``tile + k - 1``, at the tile
    sides of ``wgrad_kernels.HALO_ROW_AT``) ``x`` channel blocks programs, as many as the GPU holds at
    once (``resident`` programs an SM, from the binary's registers once a launch has told them;
    ``WGRAD_PROGRAMS_PER_SM`` before: one wave, every SM busy, and a chain of trips per program no longer
    than it must be: a trip's time is mostly memory latency, hidden only by other
    programs), chunks of at least ``WGRAD_MIN_SITES`` sites for each partial sum they write (the
    partial-sum bound) and at least one unit (tile row, or tile). ``sms``: the GPU's SM count (asked of
    ``device`` when None); without a GPU, ``WGRAD_CHUNKS`` chunks at most."""
    block_c, warps = launch_shape(channels, pairs, tile)
    halo_rows = tile in HALO_ROW_AT
    axis, slots, rows = (tile + k - 1, tile, tiles) if halo_rows else (k, 1, tiles * tile)
    if device.type == "cuda":
        sms = sms or torch.cuda.get_device_properties(device).multi_processor_count
        per_sm = resident or WGRAD_PROGRAMS_PER_SM
        wanted = max(1, per_sm * sms // (axis * triton.cdiv(channels, block_c)))  # one wave: not one program more
    else:
        wanted = WGRAD_CHUNKS
    chunks = max(1, min(wanted, tiles * tile * tile // (WGRAD_MIN_SITES * slots), rows))
    return WgradPlan(block_c, warps, chunks, rows, axis, slots)


@dwconv_tiles_wgrad.register_fake
def _dwconv_tiles_wgrad_fake(x, grad, halo, tile, taps):
    return x.new_empty(x.shape[1], taps, dtype=torch.float32), x.new_empty(x.shape[1], dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, bias, halo, tile, flip = inputs
    ctx.save_for_backward(x, weight, halo)
    ctx.tile, ctx.flip = tile, flip
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    x, weight, halo = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        # the transpose of a submanifold conv on one site set is the conv with the taps reversed
        grad_x = dwconv_tiles(grad, weight, None, halo, ctx.tile, not ctx.flip)
    wants_bias = ctx.bias_dtype is not None and ctx.needs_input_grad[2]
    if ctx.needs_input_grad[1] or wants_bias:
        # one pass: the weight grad (C, taps), as the parameter lays it out, and the bias grad
        wgrad, bgrad = dwconv_tiles_wgrad(x, grad, halo, ctx.tile, weight.shape[0])
        if ctx.needs_input_grad[1]:
            # a (taps, C) view for the (taps, C) weight the op took, which the encoder made from the parameter
            # by a transpose: autograd's transpose back is this buffer again, no copy
            grad_w = (wgrad.flip(1) if ctx.flip else wgrad).t().to(weight.dtype)
        if wants_bias:
            grad_b = bgrad.to(ctx.bias_dtype)
    return grad_x, grad_w, grad_b, None, None, None


dwconv_tiles.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.fcmae.dwconv_tiles)
def _dwconv_tiles_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """A multiply and an add per tap, channel and active site (torch.utils.flop_counter)."""
    return 2 * x_shape[0] * x_shape[1] * w_shape[0]


def glue_launches(channels: int, chunks: int, taps: int = 49) -> list[tuple[str, int]]:
    """The small launches one block's tile-path conv runs around its three kernels in a compiled step, and
    the bytes each moves: ``[(what, bytes)]`` (benchmarks/kernel_cost.py prices each at least a launch).
    The kernels read the weights and bias as the parameters hold them and write both grads in one pass,
    the forward rounds the bias itself, and the sum of the weight grad's partials over chunks writes them
    as the parameters lay them out, so what is left is the rounding of the weights (laid out
    ``(taps, C)``) and that sum. (Before
    #49 there were 12, one of them a full read of the block's grads for the bias grad: nothing around
    the kernels touches the rows any more.)"""
    w = taps * channels * 4
    return [("weights rounded, laid out (taps, C)", 2 * w),
            ("weight and bias grads summed over chunks, laid out as the parameters",
             chunks * (w + channels * 4) + w + channels * 4)]


def depthwise_conv_tiles(x: torch.Tensor, conv: torch.nn.Conv2d, tiles: StageTiles) -> torch.Tensor:
    """``conv`` (depthwise, odd square kernel, stride 1, 'same' padding) on ``(R, C)`` active rows,
    in the autocast dtype where autocast is on (a LayerNorm before it returns fp32 under CUDA
    autocast, and the canvas path's conv would run in the autocast dtype), accumulated in fp32."""
    c, _, k, _ = conv.weight.shape
    if x.is_floating_point() and _autocast_dtype(x.device.type) is not None:
        x = x.to(_autocast_dtype(x.device.type))
    # the weight rounded to x's dtype, as a conv in that dtype uses it, then held in fp32 for the kernel; the
    # rounding is kept out of the backward (straight through), so the weight grad reaches the fp32 parameter
    # as the kernel summed it in fp32, not rounded to x's dtype on the way
    weight = conv.weight.view(c, k * k).t().contiguous()  # (taps, C): what the kernel reads, made here (compiled)
    weight = weight + (weight.to(x.dtype).float() - weight).detach()
    return dwconv_tiles(x, weight, conv.bias, tiles.halo, tiles.tile)  # the op rounds the bias itself


def _autocast_dtype(device_type: str):
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except TypeError:  # an older torch without the device-type argument
        return None
    return None


def main(argv: list[str]) -> int:
    """``python -m fcmae.sparse.triton_dwconv forward|wgrad TILE [--plain]``: print a kernel's source."""
    kind, tile = (argv + ["forward", "8"])[:2]
    v = Variant(kind, int(tile), pairs="--plain" not in argv)
    print(forward_source(v) if kind == "forward" else wgrad_source(v), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

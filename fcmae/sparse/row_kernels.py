"""The source of the tile kernels' Triton code, generated per tile side (#38).

Both kernels work on one *row* of a tile at a time: the ``t`` outputs of a tile row, for a kernel
row ``ky``, read one halo row of ``t + k - 1`` sites, and each site's values serve up to ``k`` of
those outputs. Triton has no register arrays, so the ``t`` accumulators and the walk over the halo
row are written out as plain variables by this generator: each input is loaded and converted once
per halo row and used from registers by every output that reads it (the gather-per-tap kernels it
replaces loaded and converted it once per tap: 49 times). A site whose halo entry is -1 (a masked
patch or off the image) is skipped by a branch on the index, uniform over the program: at mask 0.6
most taps outside the tile cost only their index read.

bf16 inputs are read as 32-bit words of two channels and widened with one shift or mask each
(channel ``2q`` is the low half, ``2q + 1`` the high half; ``C2 = C // 2`` words a row); their weights
and outputs come and go in the same halves-split order (:func:`pair_order`). Other dtypes load and
convert plainly (``C2 = C``). The code uses nothing newer than Triton 3.0's language (torch 2.4).

    python -m fcmae.sparse.row_kernels forward 8    # print the forward's source for 8x8 tiles
"""
from __future__ import annotations

import functools
import hashlib
import linecache
import sys
from dataclasses import dataclass

import torch

from .tiles import z_order


@dataclass(frozen=True)
class Variant:
    """What the generated source depends on (everything else is a ``tl.constexpr`` of the launch)."""
    kernel: str  # "forward" (also the input grad: taps reversed) or "wgrad"
    tile: int  # sites per tile side: 8, 4, 2, 1
    k: int = 7  # kernel side
    pairs: bool = True  # bf16 as 32-bit words of two channels
    wide: bool = False  # 64-bit element offsets (a tensor of 2^31 elements or more)


def z_offset(y: int, x: int, tile: int) -> int:
    """Row offset of local site ``(y, x)`` inside a tile (:func:`fcmae.sparse.tiles.z_order`)."""
    return int(z_order(torch.tensor(y), torch.tensor(x), tile))


def words(channels: int, pairs: bool) -> int:
    """``C2``, the elements of a row as the kernels index it: 32-bit words of two channels, or channels."""
    return channels // 2 if pairs else channels


def pair_order(t: torch.Tensor) -> torch.Tensor:
    """``(..., C)`` -> the same values with even channels first, then odd: the order the pair kernels
    read weights in and write weight grads in."""
    return t.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


def unpair_order(t: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pair_order`."""
    return t.unflatten(-1, (2, -1)).transpose(-1, -2).flatten(-2)


class _Source:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, depth: int, text: str) -> None:
        self.lines.append("    " * depth + text)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _header(v: Variant, signature: str) -> _Source:
    src = _Source()
    for line in ("import triton", "import triton.language as tl", "", "", "@triton.jit", f"def {signature}:"):
        src(0, line)
    what = f"{v.tile}x{v.tile} tiles and a {v.k}x{v.k} kernel" + (", bf16 as pairs" if v.pairs else "")
    src(1, f'"""Generated for {what}: see fcmae/sparse/row_kernels.py."""')
    return src


def _y_bits(tile: int) -> str:
    """The z-order offset of a tile row ``y`` (its bits in the odd positions), as an expression."""
    bits = tile.bit_length() - 1
    return " | ".join(f"(((y >> {b}) & 1) << {2 * b + 1})" for b in range(bits)) if bits else "0"


def _load(src: _Source, depth: int, target: str, address: str, other: str) -> None:
    """Emit ``target = tl.load(address)``, masked to the channels only where the channel count does not
    fill the last block (a mask costs a predicate and a zero fill per register)."""
    src(depth, "if EVEN_C:")
    src(depth + 1, f"{target} = tl.load({address})")
    src(depth, "else:")
    src(depth + 1, f"{target} = tl.load({address}, mask=ok, other={other})")


def _site(v: Variant, ptr: str, row: str) -> str:
    """The address of row ``row``'s channel block (an expression)."""
    return f"{ptr} + {row}.to(tl.int64) * C2 + q" if v.wide else f"{ptr} + {row} * C2 + q"


def _load_values(src: _Source, depth: int, v: Variant, address: str, name: str) -> list[str]:
    """Emit the load of one site's channel block at ``address`` and its widening to fp32; returns the
    names of the fp32 tensors (the low and high halves, or one)."""
    if v.pairs:
        _load(src, depth, "u", address, "0")
        src(depth, f"{name}lo = (u << 16).to(tl.float32, bitcast=True)")
        src(depth, f"{name}hi = (u & -65536).to(tl.float32, bitcast=True)")
        return [f"{name}lo", f"{name}hi"]
    _load(src, depth, name, address, "0.0")
    src(depth, f"{name} = {name}.to(tl.float32)")
    return [name]


def _preamble(src: _Source, v: Variant, axis: int) -> list[str]:
    """Channel indices ``q`` (pairs: word indices; ``C2`` words a row), their mask, the halves' names."""
    if v.pairs:
        src(1, f"q = tl.program_id({axis}) * (BLOCK_C // 2) + tl.arange(0, BLOCK_C // 2)")
        src(1, "xw = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)")
        return ["lo", "hi"]
    src(1, f"q = tl.program_id({axis}) * BLOCK_C + tl.arange(0, BLOCK_C)")
    src(1, "xw = x_ptr")
    return [""]


def forward_source(v: Variant) -> str:
    """One program per (tile row, channel block): ``t`` outputs accumulated over ``k`` kernel rows."""
    t, k, h = v.tile, v.k, v.tile + v.k - 1
    src = _header(v, "forward(x_ptr, w_ptr, b_ptr, halo_ptr, y_ptr, C: tl.constexpr, C2: tl.constexpr, "
                     "BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_C: tl.constexpr)")
    src(1, "r = tl.program_id(0)")
    src(1, f"p = r // {t}")
    src(1, f"y = r % {t}")
    halves = _preamble(src, v, 1)
    src(1, "ok = q < C2")
    src(1, f"hrow = halo_ptr + p * {h * h} + y * {h}")
    for i in range(t):
        for s in halves:
            src(1, f"acc{s}{i} = tl.zeros([BLOCK_C // {len(halves)}], dtype=tl.float32)")
    src(1, f"for ky in range({k}):")
    src(2, f"wrow = w_ptr + ky * {k} * C")
    # a tap's weights serve t halo sites; with one (1x1 tiles) they are read only where the site is active
    lazy = t == 1
    for kx in range(k):
        for half, s in enumerate(halves):
            if not lazy:
                _load(src, 2, f"w{s}{kx}", f"wrow + {kx} * C + {half} * C2 + q", "0.0")
    for j in range(h):
        src(2, f"i{j} = tl.load(hrow + ky * {h} + {j})")
        src(2, f"if i{j} >= 0:")
        for half, s in enumerate(halves):
            if lazy:
                _load(src, 3, f"w{s}{j}", f"wrow + {j} * C + {half} * C2 + q", "0.0")
        names = _load_values(src, 3, v, _site(v, "xw", f"i{j}"), "x")
        for kx in range(k):
            if 0 <= j - kx < t:
                for s, name in zip(halves, names):
                    src(3, f"acc{s}{j - kx} += {name} * w{s}{kx}")
    src(1, "if HAS_BIAS:")
    for half, s in enumerate(halves):
        src(2, f"b{s} = tl.load(b_ptr + {half} * C2 + q, mask=ok, other=0.0)  # fp32")
        for i in range(t):
            src(2, f"acc{s}{i} += b{s}")
    base = f"(p * {t * t} + ({_y_bits(t)}))"
    src(1, f"out = {base}.to(tl.int64) * C2 + q" if v.wide else f"out = {base} * C2 + q")
    if v.pairs:
        src(1, "yw = y_ptr.to(tl.pointer_type(tl.int32), bitcast=True)")
        for i in range(t):
            src(1, f"low = acclo{i}.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 65535")
            src(1, f"high = acchi{i}.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) << 16")
            src(1, f"tl.store(yw + out + {z_offset(0, i, t)} * C2, low | high, mask=ok)")
    else:
        for i in range(t):
            src(1, f"tl.store(y_ptr + out + {z_offset(0, i, t)} * C2, acc{i}.to(y_ptr.dtype.element_ty), mask=ok)")
    return src.text()


def wgrad_source(v: Variant) -> str:
    """One program per (chunk, kernel row ``ky``, channel block): over every ``CHUNKS``-th tile row from
    ``chunk``, the products ``x[o + tap] * grad[o]`` of the row's ``k`` taps accumulate in registers;
    fp32 partial sums ``(CHUNKS, k * k, C)`` (pairs: channels in :func:`pair_order`)."""
    t, k, h = v.tile, v.k, v.tile + v.k - 1
    src = _header(v, "wgrad(x_ptr, g_ptr, halo_ptr, out_ptr, ROWS, CHUNKS, C: tl.constexpr, C2: tl.constexpr, "
                     "BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr)")
    src(1, "chunk = tl.program_id(0)")
    src(1, "ky = tl.program_id(1)")
    halves = _preamble(src, v, 2)
    src(1, "ok = q < C2")
    src(1, "gw = g_ptr.to(tl.pointer_type(tl.int32), bitcast=True)" if v.pairs else "gw = g_ptr")
    for kx in range(k):
        for s in halves:
            src(1, f"acc{s}{kx} = tl.zeros([BLOCK_C // {len(halves)}], dtype=tl.float32)")
    src(1, "for r in range(chunk, ROWS, CHUNKS):")
    src(2, f"p = r // {t}")
    src(2, f"y = r % {t}")
    base = f"(p * {t * t} + ({_y_bits(t)}))"
    src(2, f"grow = {base}.to(tl.int64) * C2 + q" if v.wide else f"grow = {base} * C2 + q")
    for i in range(t):  # the row's grads, read and widened once for the kernel row's taps
        _load_values(src, 2, v, f"gw + grow + {z_offset(0, i, t)} * C2", f"g{i}")
    src(2, f"hrow = halo_ptr + p * {h * h} + (y + ky) * {h}")
    for j in range(h):
        src(2, f"i{j} = tl.load(hrow + {j})")
        src(2, f"if i{j} >= 0:")
        names = _load_values(src, 3, v, _site(v, "xw", f"i{j}"), "x")
        for kx in range(k):
            if 0 <= j - kx < t:
                for s, name in zip(halves, names):
                    src(3, f"acc{s}{kx} += {name} * g{j - kx}{s}")
    src(1, f"out = out_ptr + (chunk * {k * k} + ky * {k}) * C + q")
    for kx in range(k):
        for half, s in enumerate(halves):
            src(1, f"tl.store(out + {kx} * C + {half} * C2, acc{s}{kx}, mask=ok)")
    return src.text()


@functools.lru_cache(maxsize=None)
def kernel(v: Variant):
    """The ``triton.jit`` function for ``v``, compiled from its generated source. The source is
    registered with :mod:`linecache` under a name that carries its hash, so ``inspect`` (which Triton
    reads a kernel's source with), tracebacks and the interpreter all see it; nothing is written to disk."""
    import triton  # noqa: F401  (the generated module imports it)
    text = forward_source(v) if v.kernel == "forward" else wgrad_source(v)
    name = f"<fcmae-{v.kernel}-t{v.tile}-k{v.k}{'-pairs' if v.pairs else ''}{'-wide' if v.wide else ''}-" \
           f"{hashlib.sha1(text.encode()).hexdigest()[:12]}>"
    linecache.cache[name] = (len(text), None, text.splitlines(True), name)  # mtime None: never evicted
    namespace: dict = {"__name__": f"fcmae_generated_{v.kernel}_t{v.tile}"}
    exec(compile(text, name, "exec"), namespace)
    return namespace[v.kernel]


def main(argv: list[str]) -> int:
    kind, tile = (argv + ["forward", "8"])[:2]
    v = Variant(kind, int(tile), pairs="--plain" not in argv)
    print(forward_source(v) if kind == "forward" else wgrad_source(v), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

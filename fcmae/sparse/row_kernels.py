"""The source of the tile kernels' Triton code, generated per tile side (#38).

Both kernels work on one *row* of a tile at a time: the ``t`` outputs of a tile row, for a kernel
row ``ky``, read one halo row of ``t + k - 1`` sites, and each site's values serve up to ``k`` of
those outputs (at 2x2 tiles a forward program takes the whole tile, both rows: ``WHOLE_TILE_AT``).
Triton has no register arrays, so the ``t`` accumulators and the walk over the halo row are written
out as plain variables by this generator: each input is loaded and converted once
per halo row and used from registers by every output that reads it (the gather-per-tap kernels it
replaces loaded and converted it once per tap: 49 times). A site whose halo entry is -1 (a masked
patch or off the image) is read by a predicated load that touches no memory and gives zeros. A trip
(one kernel row, or one tile row of the weight grad) issues all its loads (the next trip's halo
indices too) before a barrier and uses them after it, so it waits on memory about once (#49; a branch
around each site's load had made it wait once per active site). At 2x2 and 1x1 tiles the forward loads
the sites' values a trip ahead as well: there the compiler moved them below the barrier, next to their uses.

bf16 inputs are read as 32-bit words of two channels and widened with one shift or mask each
(channel ``2q`` is the low half, ``2q + 1`` the high half; ``C2 = C // 2`` words a row); the fp32
weights, bias and weight grads are read and written in their own channel order (a thread's two halves
at ``2q`` and ``2q + 1``), so no reordered copy is made around a launch; at most tile sides the forward
reads a tap's two fp32 weights of a word as one 64-bit load and takes its halves apart by register
selection (``PAIRED_WEIGHTS_AT``). Other dtypes load and convert
plainly (``C2 = C``). The code uses nothing newer than Triton 3.0's language (torch 2.4).

    python -m fcmae.sparse.triton_dwconv forward 8    # print the forward's source for 8x8 tiles
"""
from __future__ import annotations

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


class _Source:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, depth: int, text: str) -> None:
        self.lines.append("    " * depth + text)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _header(v: Variant, signature: str, jit: str = "@triton.jit") -> _Source:
    src = _Source()
    for line in ("import triton", "import triton.language as tl", "", "", jit, f"def {signature}:"):
        src(0, line)
    what = f"{v.tile}x{v.tile} tiles and a {v.k}x{v.k} kernel" + (", bf16 as pairs" if v.pairs else "")
    src(1, f'"""Generated for {what}: see fcmae/sparse/row_kernels.py."""')
    return src


def _y_bits(tile: int) -> str:
    """The z-order offset of a tile row ``y`` (its bits in the odd positions), as an expression."""
    bits = tile.bit_length() - 1
    return " | ".join(f"(((y >> {b}) & 1) << {2 * b + 1})" for b in range(bits)) if bits else "0"


def _load(src: _Source, depth: int, target: str, address: str, other: str, active: str | None = None) -> None:
    """Emit ``target = tl.load(address)``, masked to the channels only where the channel count does not
    fill the last block (a mask costs a predicate and a zero fill per register), and to ``active`` (a
    condition uniform over the program: a predicated load, no branch) where given."""
    if active:
        src(depth, "if EVEN_C:")
        # (q >= 0: always true, it gives the scalar condition the block's shape)
        src(depth + 1, f"{target} = tl.load({address}, mask=({active}) & (q >= 0), other={other})")
        src(depth, "else:")
        src(depth + 1, f"{target} = tl.load({address}, mask=({active}) & ok, other={other})")
        return
    src(depth, "if EVEN_C:")
    src(depth + 1, f"{target} = tl.load({address})")
    src(depth, "else:")
    src(depth + 1, f"{target} = tl.load({address}, mask=ok, other={other})")


def _site(v: Variant, ptr: str, row: str) -> str:
    """The address of row ``row``'s channel block (an expression)."""
    return f"{ptr} + {row}.to(tl.int64) * C2 + q" if v.wide else f"{ptr} + {row} * C2 + q"


def _load_raw(src: _Source, depth: int, v: Variant, address: str, name: str, active: str | None = None) -> str:
    """Emit the load of one site's channel block at ``address`` (predicated on ``active`` where given), as
    stored (pairs: 32-bit words); returns its name."""
    raw = f"u{name}"
    _load(src, depth, raw, address, "0" if v.pairs else "0.0", active)
    return raw


def _widen(src: _Source, depth: int, v: Variant, raw: str, name: str) -> list[str]:
    """Emit the widening of a loaded block ``raw`` to fp32; returns the names of the fp32 tensors (the low
    and high halves, or one)."""
    if v.pairs:
        src(depth, f"{name}lo = ({raw} << 16).to(tl.float32, bitcast=True)")
        src(depth, f"{name}hi = ({raw} & -65536).to(tl.float32, bitcast=True)")
        return [f"{name}lo", f"{name}hi"]
    src(depth, f"{name} = {raw}.to(tl.float32)")
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


def _channel(v: Variant, half: int) -> str:
    """The channel of a thread's word ``q``, half ``half``, in the weights' own order (pairs: ``2q``, ``2q + 1``)."""
    return f"2 * q + {half}" if v.pairs else "q"


def _weight_loads(src: _Source, depth: int, v: Variant, prefix: str, row: str) -> None:
    """Emit the loads of kernel row ``row``'s ``k`` taps of the fp32 ``(k * k, C)`` weights, as they are
    stored (channels in their order, taps row-major), into ``{prefix}{half}{kx}``; with ``FLIP`` the taps
    are read reversed (the input grad's conv), so no reversed copy of the weights is made. In pairs at the
    tile sides of ``PAIRED_WEIGHTS_AT``, channels ``2q`` and ``2q + 1`` of a tap are one 64-bit word (the
    ``w64`` pointer; a thread's 8 channels: two 16-byte loads): the low 32 bits are channel ``2q``'s
    fp32, the high ones ``2q + 1``'s (little-endian), split without an instruction of arithmetic."""
    k, halves = v.k, ("lo", "hi") if v.pairs else ("",)
    for name, tap in (("FLIP", f"({k * k - 1} - {row} * {k} - {{kx}})"), (None, f"({row} * {k} + {{kx}})")):
        src(depth, "if FLIP:" if name else "else:")
        for kx in range(k):
            if v.pairs and v.tile in PAIRED_WEIGHTS_AT:
                # a tap's two channels of a word as one 64-bit load (a thread's 8: two 16-byte loads), split
                # into the low (channel 2q) and high (2q + 1) fp32 halves by register selection
                _load(src, depth + 1, f"{prefix}{kx}", f"w64 + {tap.format(kx=kx)} * C2 + q", "0")
                src(depth + 1, f"{prefix}lo{kx} = {prefix}{kx}.to(tl.int32).to(tl.float32, bitcast=True)")
                src(depth + 1, f"{prefix}hi{kx} = ({prefix}{kx} >> 32).to(tl.int32).to(tl.float32, bitcast=True)")
                continue
            for half, s in enumerate(halves):
                _load(src, depth + 1, f"{prefix}{s}{kx}", f"w_ptr + {tap.format(kx=kx)} * C + {_channel(v, half)}",
                      "0.0")


def _forward_opening(v: Variant, ids: list[str], hrow: str, outputs: list[str]):
    """Both forward generators' start: the signature, the program's ``ids`` lines, the channel words
    ``q`` and their mask, the weights' 64-bit view where they are read in pairs, the program's first halo
    row ``hrow`` and a zero accumulator ``acc{half}{name}`` for each of ``outputs``; returns the source and
    the halves' names."""
    src = _header(v, "forward(x_ptr, w_ptr, b_ptr, halo_ptr, y_ptr, C: tl.constexpr, C2: tl.constexpr, "
                     "BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_C: tl.constexpr, FLIP: tl.constexpr)")
    for line in ids:
        src(1, line)
    halves = _preamble(src, v, 1)
    src(1, "ok = q < C2")
    if v.pairs and v.tile in PAIRED_WEIGHTS_AT:
        src(1, "w64 = w_ptr.to(tl.pointer_type(tl.int64), bitcast=True)  # fp32 weights, two channels a word")
    src(1, f"hrow = {hrow}")
    for name in outputs:
        for s in halves:
            src(1, f"acc{s}{name} = tl.zeros([BLOCK_C // {len(halves)}], dtype=tl.float32)")
    return src, halves


def _epilogue(src: _Source, v: Variant, base: str, outputs: list[tuple[str, int]]) -> None:
    """Emit the forward's end: the bias added to each accumulator ``acc{half}{name}`` of ``outputs``
    (``(name, z-order offset of its site from the row ``base``)``), rounded as the output dtype rounds it,
    and each stored at its site (pairs: two channels packed into a word)."""
    halves = ("lo", "hi") if v.pairs else ("",)
    src(1, "if HAS_BIAS:")
    for half, s in enumerate(halves):
        src(2, f"b{s} = tl.load(b_ptr + {_channel(v, half)}, mask=ok, other=0.0)  # fp32, channels in their order")
        # rounded to the output's dtype, as a conv in that dtype adds it (here, once a program, rather than
        # a launch of its own around the kernel); bf16 to nearest even on the bits, as a GPU's cast rounds
        # (Triton's interpreter truncates a cast to bf16)
        src(2, "if y_ptr.dtype.element_ty == tl.bfloat16:")
        src(3, f"u = b{s}.to(tl.int32, bitcast=True)")
        src(3, f"b{s} = ((u + 32767 + ((u >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)")
        src(2, "else:")
        src(3, f"b{s} = b{s}.to(y_ptr.dtype.element_ty).to(tl.float32)")
        for name, _ in outputs:
            src(2, f"acc{s}{name} += b{s}")
    src(1, f"out = {base}.to(tl.int64) * C2 + q" if v.wide else f"out = {base} * C2 + q")
    if v.pairs:
        src(1, "yw = y_ptr.to(tl.pointer_type(tl.int32), bitcast=True)")
        for name, offset in outputs:
            src(1, f"low = acclo{name}.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 65535")
            src(1, f"high = acchi{name}.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) << 16")
            src(1, f"tl.store(yw + out + {offset} * C2, low | high, mask=ok)")
    else:
        for name, offset in outputs:
            src(1, f"tl.store(y_ptr + out + {offset} * C2, acc{name}.to(y_ptr.dtype.element_ty), mask=ok)")


SITES_AHEAD_UP_TO = 2  # tile sides whose forward loads its sites a trip ahead
# tile sides whose forward reads a tap's weights for a word's two channels as one 64-bit load (a 16-byte
# load for two words: 14 loads a kernel row, not 56). Not at 4x4 tiles: there the SASS then moves the
# trip's multiply-adds up among its site loads, and the forward waits on memory 3 times a trip, not 1.6
PAIRED_WEIGHTS_AT = (1, 2, 8)


def forward_source(v: Variant) -> str:
    """One program per (tile row, channel block): ``t`` outputs accumulated over ``k`` kernel rows (at the
    tile sides of ``WHOLE_TILE_AT``, one per (tile, channel block): :func:`whole_tile_source`)."""
    if v.tile in WHOLE_TILE_AT:
        return whole_tile_source(v)
    t, k, h = v.tile, v.k, v.tile + v.k - 1
    src, halves = _forward_opening(v, ["r = tl.program_id(0)", f"p = r // {t}", f"y = r % {t}"],
                                   f"halo_ptr + p * {h * h} + y * {h}", [f"{i}" for i in range(t)])
    # as in the weight grad: a kernel row's halo indices are loaded one trip ahead, its sites' values by
    # predicated loads (a masked site: no memory access, zeros), all issued before a barrier and used
    # after it, so a trip waits on memory about once, not once per active site
    # (the kernel row's weights too: loaded within the trip, the compiler put each load just before its
    # first multiply-add, a wait apiece)
    for j in range(h):
        src(1, f"i{j} = tl.load(hrow + {j})")
    _weight_loads(src, 1, v, "w", "0")
    if v.tile <= SITES_AHEAD_UP_TO:
        # small tiles: the sites' values a trip ahead too (the compiler moved this trip's loads below the
        # barrier, next to their uses: a wait per site again); the next trip's come in while this one computes
        loaded = [_load_raw(src, 1, v, _site(v, "xw", f"i{j}"), f"x{j}", active=f"i{j} >= 0") for j in range(h)]
        for j in range(h):
            src(1, f"i{j} = tl.load(hrow + {min(1, k - 1) * h} + {j})")
        src(1, f"for ky in range({k}):")
        src(2, f"nky = tl.minimum(ky + 1, {k - 1})  # the next kernel row (the last trip reads its own again)")
        src(2, f"nnky = tl.minimum(ky + 2, {k - 1})")
        # (the last trip has no next one: its loads are predicated off)
        ahead = [_load_raw(src, 2, v, _site(v, "xw", f"i{j}"), f"z{j}", active=f"(i{j} >= 0) & (ky < {k - 1})")
                 for j in range(h)]
        for j in range(h):
            src(2, f"i{j} = tl.load(hrow + nnky * {h} + {j})")
    else:
        ahead = None
        src(1, f"for ky in range({k}):")
        loaded = [_load_raw(src, 2, v, _site(v, "xw", f"i{j}"), f"x{j}", active=f"i{j} >= 0") for j in range(h)]
        src(2, f"nky = tl.minimum(ky + 1, {k - 1})  # the next kernel row (the last trip reads its own again)")
        for j in range(h):
            src(2, f"i{j} = tl.load(hrow + nky * {h} + {j})")
    _weight_loads(src, 2, v, "n", "nky")
    src(2, "tl.debug_barrier()")
    for j in range(h):
        names = _widen(src, 2, v, loaded[j], f"x{j}")
        for kx in range(k):
            if 0 <= j - kx < t:
                for s, name in zip(halves, names):
                    src(2, f"acc{s}{j - kx} += {name} * w{s}{kx}")
    for kx in range(k):
        for s in halves:
            src(2, f"w{s}{kx} = n{s}{kx}")
    if ahead:
        for cur, nxt in zip(loaded, ahead):
            src(2, f"{cur} = {nxt}")
    _epilogue(src, v, f"(p * {t * t} + ({_y_bits(t)}))", [(f"{i}", z_offset(0, i, t)) for i in range(t)])
    return src.text()


# tile sides whose forward runs a program per tile, not per tile row (#49): at 2x2 tiles a tile row's two
# outputs gave each widened site value 2 multiply-adds and each weight 2; a whole tile gives both 4
WHOLE_TILE_AT = (2,)


def rows_a_program(tile: int) -> int:
    """Tile rows one forward program computes: ``tile`` at the sides of ``WHOLE_TILE_AT``, else one."""
    return tile if tile in WHOLE_TILE_AT else 1


def forward_loop(tile: int, k: int = 7) -> tuple[int, int]:
    """The forward's loop as generated: ``(iterations, trips outside the loop)``; a trip is a kernel row."""
    return (k // 2, k % 2) if tile in WHOLE_TILE_AT else (k, 0)


def _whole_tile_trip(src: _Source, depth: int, v: Variant, ky: str, rows: tuple[str, str],
                     weights: tuple[str, str]) -> None:
    """Emit trip ``ky`` of :func:`whole_tile_source`: halo row ``ky`` is widened already (names ``rows[0]``),
    row ``ky + 1``'s sites are loaded (predicated: a masked site reads nothing and gives zeros) and widened
    into ``rows[1]``; kernel row ``ky``'s weights are in ``weights[0]``, the next row's are loaded into
    ``weights[1]`` (a trip ahead: loaded in the trip that uses them, each went just before its first use),
    and the indices of halo row ``ky + 2``: all before the barrier, so a trip waits on memory about once."""
    t, k, h = v.tile, v.k, v.tile + v.k - 1
    halves = ("lo", "hi") if v.pairs else ("",)
    top, bottom = rows
    below = [_load_raw(src, depth, v, _site(v, "xw", f"i{j}"), f"{bottom}{j}", active=f"i{j} >= 0") for j in range(h)]
    for j in range(h):
        src(depth, f"i{j} = tl.load(hrow + tl.minimum({ky} + 2, {h - 1}) * {h} + {j})")
    _weight_loads(src, depth, v, weights[1], f"tl.minimum({ky} + 1, {k - 1})")
    src(depth, "tl.debug_barrier()")
    w = weights[0]
    for j in range(h):
        # halo row ky's site j (tile row 0) is used up before row ky + 1's (tile row 1) is widened
        for r in range(t):
            names = [f"{top}{j}{s}" for s in halves] if r == 0 else _widen(src, depth, v, below[j], f"{bottom}{j}")
            for kx in range(k):
                if 0 <= j - kx < t:
                    for s, name in zip(halves, names):
                        src(depth, f"acc{s}{r}{j - kx} += {name} * {w}{s}{kx}")


def whole_tile_source(v: Variant) -> str:
    """One program per (2x2 tile, channel block). Trip ``ky`` applies kernel row ``ky`` to halo rows ``ky``
    (tile row 0) and ``ky + 1`` (tile row 1): each halo row is loaded and widened once, in the trip that
    first uses it, and kept widened for the next (where it is tile row 0's); a kernel row's weights serve
    all four outputs. Per tile, 8 halo rows read and widened, not 14."""
    t, k, h = v.tile, v.k, v.tile + v.k - 1
    assert t == 2, "a whole tile a program is written for 2x2 tiles (two tile rows)"
    src, halves = _forward_opening(v, ["p = tl.program_id(0)"], f"halo_ptr + p * {h * h}",
                                   [f"{r}{i}" for r in range(t) for i in range(t)])
    # halo row 0, widened before the loop; row 1's indices
    for j in range(h):
        src(1, f"i{j} = tl.load(hrow + {j})")
    first = [_load_raw(src, 1, v, _site(v, "xw", f"i{j}"), f"a{j}", active=f"i{j} >= 0") for j in range(h)]
    for j in range(h):
        src(1, f"i{j} = tl.load(hrow + {h} + {j})")
    for j, raw in enumerate(first):
        _widen(src, 1, v, raw, f"a{j}")
    _weight_loads(src, 1, v, "w", "0")
    # two trips an iteration, the rows' and the weights' registers swapping roles between them (a trip an
    # iteration copied the carried row and weights at its end: 32 moves of a 4-channel trip's 256 lines);
    # trip k - 1 after the loop
    src(1, f"for m in range({k // 2}):")
    _whole_tile_trip(src, 2, v, "2 * m", ("a", "b"), ("w", "n"))
    _whole_tile_trip(src, 2, v, "2 * m + 1", ("b", "a"), ("n", "w"))
    if k % 2:
        _whole_tile_trip(src, 1, v, f"{k - 1}", ("a", "b"), ("w", "n"))
    _epilogue(src, v, f"(p * {t * t})", [(f"{r}{i}", z_offset(r, i, t)) for r in range(t) for i in range(t)])
    return src.text()

"""The source of the weight grad's Triton code, generated per tile side (#38, #49); the helpers and the
forward are in :mod:`fcmae.sparse.row_kernels`.

Two ways to split the work over programs, both summing ``x[o + tap] * grad[o]`` over active outputs ``o``
into fp32 partial sums per chunk of the tiles, which one small launch sums (``triton_dwconv.sum_partials``):

- **a kernel row a program** (:func:`kernel_row_source`): a program per (chunk, kernel row ``ky``, channel
  block) walks every ``CHUNKS``-th tile row; a trip reads the tile row's grads and the one halo row that
  ``ky`` pairs them with. Each grad is read by the ``k`` kernel-row programs, each halo row by every
  output row it serves.
- **a halo row a program** (:func:`halo_row_source`, at the tile sides of ``HALO_ROW_AT``): a program per
  (chunk, halo row ``hh``, channel block) walks every ``CHUNKS``-th tile; a trip reads halo row ``hh``
  once and every tile row's grads, and serves each pair (tile row ``y``, kernel row ``hh - y``): ``t``
  kernel rows of accumulators at once. A halo row leaves L2 once a tile, not once per output row that
  reads it (at 2x2 tiles: 8 halo-row reads a tile, not 14); only small tiles have registers for it.

    python -m fcmae.sparse.triton_dwconv wgrad 2    # print the weight grad's source for 2x2 tiles
"""
from __future__ import annotations

from .row_kernels import Variant, _header, _load_raw, _preamble, _site, _widen, _y_bits, z_offset

HALO_ROW_AT = (2,)  # tile sides whose weight grad runs a halo row a program


def wgrad_source(v: Variant) -> str:
    """The weight grad's source for ``v``: a halo row a program at the tile sides of ``HALO_ROW_AT``, a
    kernel row a program elsewhere."""
    return halo_row_source(v) if v.tile in HALO_ROW_AT else kernel_row_source(v)


def _opening(v: Variant, row: str):
    """Both generators' start: the signature (``ROWS`` and ``CHUNKS`` not specialised), the chunk and
    ``row`` (the grid's second axis) as program ids, the channel words ``q`` and their mask, the grads'
    pointer; returns the source and the halves' names."""
    src = _header(v, "wgrad(x_ptr, g_ptr, halo_ptr, out_ptr, ROWS, CHUNKS, C: tl.constexpr, C2: tl.constexpr, "
                     "BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr)",
                  jit='@triton.jit(do_not_specialize=["ROWS", "CHUNKS"])')
    src(1, "chunk = tl.program_id(0)")
    src(1, f"{row} = tl.program_id(1)")
    halves = _preamble(src, v, 2)
    src(1, "ok = q < C2")
    src(1, "gw = g_ptr.to(tl.pointer_type(tl.int32), bitcast=True)" if v.pairs else "gw = g_ptr")
    return src, halves


def _columns(v: Variant) -> list[tuple[str, str]]:
    """``(channel, half)`` of a thread's word ``q`` as the partial sums store it: channels in their own
    order (a pair's low half is channel 2q, its high half 2q + 1)."""
    return [("2 * q", "lo"), ("2 * q + 1", "hi")] if v.pairs else [("q", "")]


def kernel_row_source(v: Variant) -> str:
    """One program per (chunk, kernel row ``ky``, channel block): over every ``CHUNKS``-th tile row from
    ``chunk``, the products ``x[o + tap] * grad[o]`` of the row's ``k`` taps accumulate in registers, and
    the ``ky == 0`` programs also sum the grads (the bias grad, which would otherwise read every grad
    again). fp32 partial sums ``(CHUNKS, k * k + 1, C)``, channels in their own order, row ``k * k`` the
    bias grad's.

    A trip issues all its loads before it uses any: the grads, the halo indices, then every halo site's
    values as *predicated* loads (a masked site's lanes load nothing and read as zero), so the trip waits
    on memory about twice (indices, then values) rather than once per active site, as a branch around
    each site's load made it (#49: ~10 dependent L2 round trips a trip at stage 0). The multiply-adds
    of a masked site run on zeros: a few more issue slots, no memory. ``ROWS`` and ``CHUNKS`` are not
    specialised (``do_not_specialize``), so the start-up self-test runs the binary training runs."""
    t, k, h = v.tile, v.k, v.tile + v.k - 1
    src, halves = _opening(v, "ky")
    for kx in range(k):
        for s in halves:
            src(1, f"acc{s}{kx} = tl.zeros([BLOCK_C // {len(halves)}], dtype=tl.float32)")
    for s in halves:
        src(1, f"bias{s} = tl.zeros([BLOCK_C // {len(halves)}], dtype=tl.float32)")
    # the halo indices of a trip are loaded one trip ahead (the first trip's before the loop), so a trip's
    # site loads wait on nothing it loaded itself
    src(1, f"hrow = halo_ptr + (chunk // {t}) * {h * h} + (chunk % {t} + ky) * {h}")
    for j in range(h):
        src(1, f"i{j} = tl.load(hrow + {j})")
    src(1, "for r in range(chunk, ROWS, CHUNKS):")
    src(2, f"p = r // {t}")
    src(2, f"y = r % {t}")
    base = f"(p * {t * t} + ({_y_bits(t)}))"
    src(2, f"grow = {base}.to(tl.int64) * C2 + q" if v.wide else f"grow = {base} * C2 + q")
    graw = [_load_raw(src, 2, v, f"gw + grow + {z_offset(0, i, t)} * C2", f"g{i}") for i in range(t)]
    loaded = [_load_raw(src, 2, v, _site(v, "xw", f"i{j}"), f"x{j}", active=f"i{j} >= 0") for j in range(h)]
    src(2, "rn = tl.minimum(r + CHUNKS, ROWS - 1)  # the next trip's row (the last trip reads its own again)")
    src(2, f"hrow = halo_ptr + (rn // {t}) * {h * h} + (rn % {t} + ky) * {h}")
    for j in range(h):
        src(2, f"i{j} = tl.load(hrow + {j})")
    # a barrier between the loads and their uses: the compiler otherwise interleaves each load with its
    # multiply-adds (ptxas then reuses one register for every site: a full memory latency per site);
    # here every load of the trip is in flight before the first use waits
    src(2, "tl.debug_barrier()")
    for i in range(t):  # the row's grads, widened once for the kernel row's taps; their sum is the bias grad's
        for s, name in zip(halves, _widen(src, 2, v, graw[i], f"g{i}")):
            src(2, f"bias{s} += {name}")
    for j in range(h):
        names = _widen(src, 2, v, loaded[j], f"x{j}")
        for kx in range(k):
            if 0 <= j - kx < t:
                for s, name in zip(halves, names):
                    src(2, f"acc{s}{kx} += {name} * g{j - kx}{s}")
    src(1, f"out = out_ptr + (chunk * {k * k + 1} + ky * {k}) * C")
    columns = _columns(v)
    for kx in range(k):
        for column, s in columns:
            src(1, f"tl.store(out + {kx} * C + {column}, acc{s}{kx}, mask=ok)")
    src(1, f"bias_row = out_ptr + (chunk * {k * k + 1} + {k * k}) * C")
    for column, s in columns:
        src(1, f"tl.store(bias_row + {column}, bias{s}, mask=ok & (ky == 0))")
    return src.text()


def halo_row_source(v: Variant) -> str:
    """One program per (chunk, halo row ``hh``, channel block): over every ``CHUNKS``-th tile from ``chunk``
    (``ROWS`` tiles), halo row ``hh``'s sites times the grads of tile row ``y`` accumulate into kernel row
    ``hh - y`` for every ``y`` that has it (``0 <= hh - y < k``; the others' grads load as zeros). Partial
    sums ``(CHUNKS * t, k * k + 1, C)``: slot ``chunk * t + y`` holds tile row ``y``'s kernel rows (each
    written by the program of halo row ``y + ky``) and its bias grad (written by the program of halo row
    ``y``), so every value of it is written once. Loads and barrier as :func:`kernel_row_source`."""
    t, k, h = v.tile, v.k, v.tile + v.k - 1
    src, halves = _opening(v, "hh")
    for y in range(t):
        src(1, f"has{y} = (hh >= {y}) & (hh < {y + k})  # tile row {y} pairs with kernel row hh - {y}")
        for name in [f"acc{y}{s}{kx}" for kx in range(k) for s in halves] + [f"bias{y}{s}" for s in halves]:
            src(1, f"{name} = tl.zeros([BLOCK_C // {len(halves)}], dtype=tl.float32)")
    src(1, f"hrow = halo_ptr + chunk * {h * h} + hh * {h}")
    for j in range(h):
        src(1, f"i{j} = tl.load(hrow + {j})")
    src(1, "for p in range(chunk, ROWS, CHUNKS):")
    src(2, f"grow = tl.cast(p * {t * t}, tl.int64) * C2 + q" if v.wide else f"grow = p * {t * t} * C2 + q")
    graw = {(y, i): _load_raw(src, 2, v, f"gw + grow + {z_offset(y, i, t)} * C2", f"g{y}_{i}", active=f"has{y}")
            for y in range(t) for i in range(t)}
    loaded = [_load_raw(src, 2, v, _site(v, "xw", f"i{j}"), f"x{j}", active=f"i{j} >= 0") for j in range(h)]
    src(2, "pn = tl.minimum(p + CHUNKS, ROWS - 1)  # the next trip's tile (the last trip reads its own again)")
    src(2, f"hrow = halo_ptr + pn * {h * h} + hh * {h}")
    for j in range(h):
        src(2, f"i{j} = tl.load(hrow + {j})")
    src(2, "tl.debug_barrier()  # every load of the trip in flight before the first use waits (see above)")
    grads = {}
    for (y, i), raw in graw.items():
        grads[y, i] = _widen(src, 2, v, raw, f"g{y}_{i}")
        for s, name in zip(halves, grads[y, i]):
            src(2, f"bias{y}{s} += {name}")
    for j in range(h):
        names = _widen(src, 2, v, loaded[j], f"x{j}")
        for kx in range(k):
            for y in range(t):
                if 0 <= j - kx < t:
                    for s, name, g in zip(halves, names, grads[y, j - kx]):
                        src(2, f"acc{y}{s}{kx} += {name} * {g}")
    columns = _columns(v)
    for y in range(t):
        src(1, f"slot = out_ptr + (chunk * {t} + {y}) * {k * k + 1} * C")
        for kx in range(k):
            for column, s in columns:
                src(1, f"tl.store(slot + ((hh - {y}) * {k} + {kx}) * C + {column}, acc{y}{s}{kx}, mask=ok & has{y})")
        for column, s in columns:
            src(1, f"tl.store(slot + {k * k} * C + {column}, bias{y}{s}, mask=ok & (hh == {y}))")
    return src.text()

"""What the tile kernels cost on a real GPU, read without one: every launch configuration the encoder
can use is compiled by Triton for a named target (sm_80, sm_90) and its PTX read by the ``ptxas`` that
Triton's wheel bundles (``-v``: registers, spill stores, shared memory).

A configuration is what the kernels are specialised on: tile side (one per stage: 8, 4, 2, 1 sites at
the 1/4 ... 1/32 grids), reach, channel block and dtype. The image size changes how many tiles there
are, not the code, so one image size covers all. Used by ``tests/sparse/test_kernel_resources.py`` (no
spills anywhere) and ``benchmarks/kernel_resources.py`` (the table in docs/benchmarks.md).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

from ..models.variants import VARIANTS

STAGE_TILES = ((8, 1), (4, 1), (2, 2), (1, 3))  # (tile side, reach in tiles) of stages 0-3, 7x7 kernel
TAPS = 49


@dataclass(frozen=True)
class KernelConfig:
    kernel: str  # "forward" (also the input grad: the same kernel, taps reversed, no bias) or "wgrad"
    tile: int
    reach: int
    channels: int  # a constexpr of the generated kernels: each width compiles its own binary
    block_c: int
    warps: int
    dtype: str  # "bf16" | "fp32"

    @property
    def pairs(self) -> bool:
        return self.dtype == "bf16" and self.channels % 2 == 0

    @property
    def even_c(self) -> bool:
        return self.channels % self.block_c == 0


@dataclass
class Resources:
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int


def launch_configs(dtypes=("bf16", "fp32")) -> dict[KernelConfig, list[str]]:
    """Every distinct configuration the encoder launches, with the (size, stage, channels) using it."""
    out: dict[KernelConfig, list[str]] = {}
    for name, variant in VARIANTS.items():
        for stage, ((tile, reach), channels) in enumerate(zip(STAGE_TILES, variant.dims)):
            for dtype in dtypes:
                fwd, wgrad = stage_configs(tile, reach, channels, dtype)
                for cfg in (fwd, wgrad):
                    out.setdefault(cfg, []).append(f"{name} s{stage} ({channels})")
    return out


def stage_configs(tile: int, reach: int, channels: int, dtype: str) -> tuple[KernelConfig, KernelConfig]:
    """The forward's and the weight grad's configurations at one stage, as the ops choose them."""
    from .triton_dwconv import launch_shape
    pairs = dtype == "bf16" and channels % 2 == 0
    return tuple(KernelConfig(kind, tile, reach, channels, *launch_shape(channels, pairs, tile, kind == "forward"),
                              dtype) for kind in ("forward", "wgrad"))


def compile_kernel(cfg: KernelConfig, arch: int):
    """Triton's compiled kernel for ``cfg`` on ``sm_<arch>``, specialised as the JIT specialises the
    launches that run: every pointer divisible by 16 (torch's allocations are), the channel count a
    constexpr (the weight grad's row and chunk counts are left unspecialised: they come from the batch
    and the SM count). Without the pointers' divisibility the table would read another binary."""
    import triton
    from triton.backends.compiler import GPUTarget

    from .row_kernels import Variant, words
    from .triton_dwconv import kernel
    ptr = f"*{cfg.dtype}"
    fn = kernel(Variant(cfg.kernel, cfg.tile, 7, cfg.pairs))
    if cfg.kernel == "forward":
        sig = {"x_ptr": ptr, "w_ptr": "*fp32", "b_ptr": "*fp32", "halo_ptr": "*i32", "y_ptr": ptr}
        consts = {"HAS_BIAS": True, "FLIP": False}  # the encoder's convs have a bias; the input grad has none
    else:
        sig = {"x_ptr": ptr, "g_ptr": ptr, "halo_ptr": "*i32", "out_ptr": "*fp32", "ROWS": "i32", "CHUNKS": "i32"}
        consts = {}
    divisible = [name for name, kind in sig.items() if kind.startswith("*")]
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    consts.update(C=cfg.channels, C2=words(cfg.channels, cfg.pairs), BLOCK_C=cfg.block_c, EVEN_C=cfg.even_c)
    sig.update({name: "constexpr" for name in consts})
    try:
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    except TypeError:  # Triton releases before 3.3 called them constants
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constants=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": cfg.warps}), cfg.warps


def _tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_config(cfg: KernelConfig, arch: int, compiled=None) -> tuple[Resources, str]:
    """Compile ``cfg`` for ``sm_<arch>`` (or take ``compiled``, its kernel from :func:`compile_kernel`)
    and read ``ptxas -v``; returns the resources and the raw report."""
    if compiled is None:
        compiled, _ = compile_kernel(cfg, arch)
    ptxas = _tool("ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", ptx, "-o", os.devnull], capture_output=True,
                              text=True, check=True)
    report = proc.stdout + proc.stderr

    def num(pattern: str) -> int:
        m = re.search(pattern, report)
        return int(m.group(1)) if m else 0
    shared = compiled.metadata.shared if hasattr(compiled.metadata, "shared") else num(r"(\d+) bytes smem")
    return Resources(num(r"Used (\d+) registers"), num(r"(\d+) bytes spill stores"), num(r"(\d+) bytes spill loads"),
                     num(r"(\d+) bytes stack frame"), int(shared)), report


def bytes_per_site(cfg: KernelConfig) -> dict[str, int]:
    """Global-memory bytes each kernel asks for per active site and channel at most (what cache must
    absorb; masked sites are skipped): the forward reads each halo site once per output row it serves (a
    tile row reads 7 halo rows) and writes one output; the weight grad reads the grad once per kernel row
    and the input as the forward does."""
    elem = 2 if cfg.dtype == "bf16" else 4
    halo_reads = -(-(cfg.tile + 6) * 7 // cfg.tile)  # a tile row's 7 halo rows of t + 6 sites, per output
    if cfg.kernel == "forward":
        return {"read": halo_reads * elem, "write": elem}
    return {"read": (halo_reads + 7) * elem, "write": 0}


@dataclass
class Loop:
    """A loop of the SASS: its body's instructions (label to backward branch) and its byte range."""
    start: int
    end: int
    instructions: int


def disassemble(cubin: bytes) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """A cubin's SASS (``nvdisasm -c``): ``(address, instruction)`` in order, and each label's address."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
    lines, labels, pending = [], {}, []
    for line in sass.splitlines():
        m = re.match(r"\s*(\.L\w+):", line)
        if m:
            pending.append(m.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;?\s*$", line)
        if m:
            addr = int(m.group(1), 16)
            labels.update({name: addr for name in pending})
            pending = []
            lines.append((addr, m.group(2)))
    return lines, labels


def sass_loops(cubin: bytes) -> tuple[list[Loop], int]:
    """The loops of a kernel's SASS, innermost first, and the kernel's instruction count. A loop is a
    backward branch to a label; on sm_80/sm_90 every instruction is 16 bytes."""
    lines, labels = disassemble(cubin)
    loops = []
    for addr, text in lines:
        b = re.search(r"BRA\s+`?\(?(\.L\w+)", text)
        if b and b.group(1) in labels and labels[b.group(1)] < addr:
            loops.append(Loop(labels[b.group(1)], addr, (addr - labels[b.group(1)]) // 16 + 1))
    loops.sort(key=lambda lp: lp.instructions)
    return loops, (lines[-1][0] // 16 + 1) if lines else 0


@dataclass
class Skip:
    """Instructions a loop runs only where one halo site is active: a forward branch ``@!P BRA`` whose
    predicate tests a halo index (``ISETP.GE ... RZ``) loaded at ``column`` * 4 bytes past the first index
    of its halo row (None where the index could not be traced: count it as always run)."""
    instructions: int
    column: int | None
    start: int = 0  # the branch's address: the skipped instructions lie in (start, end)
    end: int = 0


# a 32-bit unpredicated load at a 64-bit base register plus an offset: how the kernels read a halo index
_INDEX_LOAD = re.compile(r"LDG\.E\s+R(\d+),\s*desc\[\w+\]\[(R\d+)\.64(?:\+(-?0x[0-9a-f]+))?\]")


def _index_test(text: str) -> tuple[str, int] | None:
    """``(predicate, register)`` where ``text`` sets a predicate to ``register >= 0`` (``ISETP.GE ... RZ``
    or ``ISETP.GT ... -0x1``: the two ways ptxas writes a halo index's test)."""
    m = re.match(r"ISETP\.GE\.AND\s+(P\d),\s*PT,\s*R(\d+),\s*RZ", text) or \
        re.match(r"ISETP\.GT\.AND\s+(P\d),\s*PT,\s*R(\d+),\s*-0x1\b", text)
    return (m.group(1), int(m.group(2))) if m else None


def halo_skips(cubin: bytes, loop: Loop) -> list[Skip]:
    """The branches over masked halo sites in ``loop`` (row_kernels.py emits one per halo column), traced
    from the branch's predicate to the index load that set it."""
    lines, labels = disassemble(cubin)
    body = [(a, t) for a, t in lines if loop.start <= a <= loop.end]
    loaded, tested, index_offsets, found = {}, {}, {}, []
    for addr, text in body:
        m = _INDEX_LOAD.match(text)
        if m:  # a 32-bit unpredicated load: a halo index
            offset = int(m.group(3), 16) if m.group(3) else 0
            loaded[int(m.group(1))] = (m.group(2), offset)
            index_offsets.setdefault(m.group(2), set()).add(offset)
        test = _index_test(text)
        if test:
            tested[test[0]] = loaded.get(test[1])
        m = re.match(r"@!(P\d)\s+BRA\s+`?\(?(\.L\w+)", text)
        if m and labels.get(m.group(2), 0) > addr:
            source = tested.get(m.group(1))
            found.append((addr, labels[m.group(2)], source))
    skips = []
    for addr, target, source in found:
        column = None if source is None else (source[1] - min(index_offsets[source[0]])) // 4
        skips.append(Skip((target - addr) // 16 - 1, column, addr, target))
    return skips


_REG = re.compile(r"\bR(\d+)(\.64)?\b")
_WIDTH = {"": 4, ".64": 8, ".128": 16, ".U16": 2, ".S16": 2, ".U8": 1, ".S8": 1}


def _registers(operand: str) -> set[int]:
    """The registers an operand names (``R4.64`` is R4 and R5; ``RZ`` none)."""
    out = set()
    for m in _REG.finditer(operand):
        n = int(m.group(1))
        out.update((n, n + 1) if m.group(2) else (n,))
    return out


@dataclass
class LoadTraffic:
    """What one warp's trip through a loop asks of the memory system, expected over the halo sites'
    activity (a branch's or a predicate's column, as :func:`halo_skips` traces them), for a given memory
    latency:

    - ``cycles``: the warp's own time for a trip, alone: one instruction a cycle, and an instruction that
      reads (or overwrites) the result of a load still in flight waits until it lands (``latency`` cycles
      after its issue). Loads issued together wait once; a load used right after its issue (the
      branch-per-site pattern) waits a full latency each time;
    - ``round_trips``: the trip's stalls in units of the latency (how many full memory round trips the
      warp waits through one after the other);
    - ``in_flight``: the most bytes the warp has outstanding at once (Little's law: what an SM keeps in
      flight is this times its resident warps)."""
    cycles: float
    round_trips: float
    in_flight: float
    loads: int


def load_traffic(cubin: bytes, loop: Loop, activity: list[float], latency: float = 500.0) -> LoadTraffic:
    """Walk ``loop``'s body in program order (SASS issues in order) and time one warp's trip through it,
    each instruction weighted by the share of trips that run it (1 outside the halo-site branches; a
    branch's or a guarding predicate's column activity inside): its issue cycle and its stall count with
    that weight. Expected values, not a cycle-exact simulation: enough to tell a trip
    that waits once from one that waits once per site."""
    lines, _ = disassemble(cubin)
    skips = [s for s in halo_skips(cubin, loop) if s.column is not None]
    return walk_loads([(a, t) for a, t in lines if loop.start <= a <= loop.end], skips, activity, latency)


def walk_loads(body: list[tuple[int, str]], skips: list[Skip], activity: list[float],
               latency: float = 500.0) -> LoadTraffic:
    """:func:`load_traffic` on a loop body given as ``(address, SASS instruction)`` in order."""
    offsets: dict[str, set] = {}
    for _, text in body:
        m = _INDEX_LOAD.match(text)
        if m:
            offsets.setdefault(m.group(2), set()).add(int(m.group(3), 16) if m.group(3) else 0)
    column_of: dict[int, int] = {}  # register -> the halo column of the index it holds (as last loaded)
    index_load: set[int] = set()  # registers that are ever tested as halo indices
    for _, text in body:
        tested = _index_test(text)
        if tested:
            index_load.add(tested[1])
    predicate_column: dict[str, int] = {}  # predicate -> the column whose activity it tests (as last set)

    def weight_at(addr: int, guard: str | None) -> float:
        w = 1.0
        for s in skips:
            if s.start < addr < s.end:
                w = min(w, activity[s.column])
        if guard and guard.startswith("@P") and guard[1:] in predicate_column:
            w = min(w, activity[predicate_column[guard[1:]]])
        return w

    pending: list[tuple[set[int], float, float, float]] = []  # (registers, bytes, lands at, share issued)
    # twice through: the first trip leaves in flight what the loop issues ahead for the next (a pipelined
    # load at the end of the body waited for at its start); only the second trip counts
    clock = stalled = in_flight = 0.0
    loads = 0
    for addr, text in body + [(None, None)] + body:
        if addr is None:
            start, stalled, in_flight, loads = clock, 0.0, 0.0, 0
            continue
        m = re.match(r"(@!?P\d\s+)?(\S+)\s*(.*)", text)
        guard, op, rest = (m.group(1) or "").strip() or None, m.group(2), m.group(3)
        operands = [o.strip() for o in rest.split(",")] if rest else []
        w = weight_at(addr, guard)
        m = _INDEX_LOAD.match(text)
        if m:  # a 32-bit load: a halo index where its base register reads indices
            column_of[int(m.group(1))] = ((int(m.group(3), 16) if m.group(3) else 0) - min(offsets[m.group(2)])) // 4 \
                % len(activity)  # a halo row holds len(activity) indices
        tested = _index_test(text)
        if tested and tested[1] in column_of:
            predicate_column[tested[0]] = column_of[tested[1]]
        is_load = op.startswith("LDG")
        if op.startswith(("STG", "ST.", "RED")):
            dest, sources = set(), set().union(*(_registers(o) for o in operands))
        else:
            dest = _registers(operands[0]) if operands and not operands[0].startswith(("P", "UP", "desc")) else set()
            sources = set().union(*(_registers(o) for o in operands[1:])) if len(operands) > 1 else set()
        touched = sources | dest
        waited = [(lands, lw) for regs, _, lands, lw in pending if regs & touched]
        if waited:
            # an instruction run w of the trips, waiting on loads issued at most max(lw) of them
            stall = max(0.0, max(lands for lands, _ in waited) - clock) * w * max(lw for _, lw in waited)
            clock += stall
            stalled += stall
            # in expectation: what was waited for, and every load issued before it, has landed
            pending = [p for p in pending if p[2] > max(lands for lands, _ in waited)]
        clock += w
        if is_load:
            suffix = re.match(r"LDG\.E((?:\.(?:64|128|U16|S16|U8|S8))?)", op)
            width = _WIDTH[suffix.group(1)] if suffix else 4
            first = min(dest) if dest else -1
            nbytes = (32 if first in index_load else 32 * width) * w
            pending.append(({first + i for i in range(max(1, width // 4))}, nbytes, clock + latency, w))
            loads += 1
            in_flight = max(in_flight, sum(b for _, b, lands, _ in pending if lands > clock))
    return LoadTraffic(clock - start, stalled / latency, in_flight, loads)

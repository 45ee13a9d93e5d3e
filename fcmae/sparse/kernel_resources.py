"""What the tile kernels cost on a real GPU, read without one: every launch configuration the encoder
can use is compiled by Triton for a named target (sm_80, sm_90) and its PTX read by the ``ptxas`` that
Triton's wheel bundles (``-v``: registers, spill stores, shared memory).

A configuration is what the kernels are specialised on: tile side (one per stage: 8, 4, 2, 1 sites at
the 1/4 ... 1/32 grids), reach, channel block and dtype. The image size changes how many tiles there
are, not the code, so one image size covers all. Used by ``tests/test_kernel_resources.py`` (no
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
    block_c: int
    dtype: str  # "bf16" | "fp32"
    c_div16: bool = True  # the channel count divides by 16: the JIT specialises on it (16-byte loads)
    even_c: bool = True  # the channel count divides by the channel block: no channel mask (forward)


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
    from .triton_dwconv import _block_c, _wgrad_block_c, wgrad_group
    div16 = channels % 16 == 0
    block_c = _block_c(channels, tile * tile)
    fwd = KernelConfig("forward", tile, reach, block_c, dtype, div16, channels % block_c == 0)
    wg_block_c = _wgrad_block_c(channels, wgrad_group(tile) * tile * tile)
    return fwd, KernelConfig("wgrad", tile, reach, wg_block_c, dtype, div16, channels % wg_block_c == 0)


def compile_kernel(cfg: KernelConfig, arch: int):
    """Triton's compiled kernel for ``cfg`` on ``sm_<arch>``, specialised as the JIT specialises the
    launches that run: every pointer divisible by 16 (torch's allocations are), the channel count too
    where it divides by 16 (the weight grad's chunk count is left unspecialised: it comes from the SM
    count and the batch). Without it the table reads another binary (the forward at tile 8: 170
    registers unspecialised on sm_90, 123 as it runs)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from . import triton_dwconv as k
    ptr = f"*{cfg.dtype}"
    if cfg.kernel == "forward":
        fn = k._dwconv_tiles_kernel
        sig = {"x_ptr": ptr, "w_ptr": "*fp32", "b_ptr": ptr, "halo_ptr": "*i32", "y_ptr": ptr, "C": "i32"}
        # the encoder's depthwise convs have a bias; the input grad has none
        consts = {"HAS_BIAS": True, "EVEN_C": cfg.even_c, "WIDE": False}
        divisible = ["x_ptr", "w_ptr", "b_ptr", "halo_ptr", "y_ptr"]
    else:
        fn = k._dwconv_tiles_wgrad_kernel
        sig = {"x_ptr": ptr, "g_ptr": ptr, "halo_ptr": "*i32", "out_ptr": "*fp32", "P": "i32", "C": "i32",
               "CHUNKS": "i32"}
        consts = {"GROUP": k.wgrad_group(cfg.tile), "WIDE": False}
        divisible = ["x_ptr", "g_ptr", "halo_ptr", "out_ptr"]
    if cfg.c_div16:
        divisible.append("C")
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    consts.update(TILE=cfg.tile, LOG2T=cfg.tile.bit_length() - 1, K=7, BLOCK_C=cfg.block_c)
    sig.update({name: "constexpr" for name in consts})
    try:
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    except TypeError:  # Triton releases before 3.3 called them constants
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constants=consts, attrs=attrs)
    warps = k.NUM_WARPS if cfg.kernel == "forward" else k.WGRAD_NUM_WARPS
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps}), warps


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
    """Global-memory bytes each kernel asks for per active site and channel (what cache must absorb):
    the forward gathers every tap's input and writes one output; the weight grad reads the grad once
    and every tap's input (the old tap-per-program layout read the grad 49 times as well)."""
    elem = 2 if cfg.dtype == "bf16" else 4
    if cfg.kernel == "forward":
        return {"read": TAPS * elem, "write": elem}
    return {"read": (TAPS + 1) * elem, "write": 0}


@dataclass
class Loop:
    """A loop of the SASS: its body's instructions (label to backward branch) and its byte range."""
    start: int
    end: int
    instructions: int


def sass_loops(cubin: bytes) -> tuple[list[Loop], int]:
    """The loops of a kernel's SASS (``nvdisasm -c``), innermost first, and the kernel's instruction
    count. A loop is a backward branch to a label; on sm_80/sm_90 every instruction is 16 bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
    labels, loops, last = {}, [], 0
    pending = []
    for line in sass.splitlines():
        m = re.match(r"\s*(\.L\w+):", line)
        if m:
            pending.append(m.group(1))
            continue
        m = re.match(r"\s*/\*([0-9a-f]+)\*/\s+(.*)", line)
        if not m:
            continue
        addr, text = int(m.group(1), 16), m.group(2)
        for name in pending:
            labels[name] = addr
        pending, last = [], addr
        b = re.search(r"BRA\s+`?\(?(\.L\w+)", text)
        if b and b.group(1) in labels and labels[b.group(1)] < addr:
            loops.append(Loop(labels[b.group(1)], addr, (addr - labels[b.group(1)]) // 16 + 1))
    loops.sort(key=lambda lp: lp.instructions)
    return loops, last // 16 + 1

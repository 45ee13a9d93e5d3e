"""A static cost model of the tile kernels, read without a GPU (#38): each launch configuration is
compiled for sm_90 as the JIT specialises it, its SASS disassembled (the ``nvdisasm`` in Triton's
wheel), the instructions of its hot loop counted and multiplied by its trip count and by the programs
of the launch, for one model at one batch. The kernels skip a masked halo site with a branch
(row_kernels.py): each branch's instructions count with the share of its halo column that is active
under the app's own masks at the given ratio (seeded; the halo tables the app builds). Beside that
issue-bound floor: the memory-bound floor of the same launch (the bytes it must move at least once),
and the canvas path's memory floor (scatter to a zero canvas, cuDNN's conv, gather back; the same for
the input grad; a weight grad that reads two canvases).

Assumed machine (state it with any number quoted): an H200 SXM (the H100's SMs), 132 SMs, 4 warp
schedulers each issuing at most one instruction a cycle, 1.98 GHz, 64 resident warps, 32 resident
programs and 64K registers per SM, 4.8 TB/s of HBM bandwidth. The issue floor of a launch is the
larger of (a) all its warp-instructions spread over every scheduler and (b) one warp's own
instructions, one a cycle, times the waves its programs need at the occupancy its registers allow.
Both are floors: stalls, latency and the straight-line code outside the loops come on top.

    TRITON_INTERPRET=0 python benchmarks/kernel_cost.py [--model base] [--batch 128] [--dtype bf16]
"""
import argparse
import json
import math
import os
import sys
import time

import torch

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret (read when triton is imported)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fcmae.models.masking import random_mask  # noqa: E402
from fcmae.models.variants import get_variant  # noqa: E402
from fcmae.sparse import triton_dwconv as k  # noqa: E402
from fcmae.sparse.kernel_resources import (STAGE_TILES, TAPS, KernelConfig, compile_config,  # noqa: E402
                                           compile_kernel, halo_skips, sass_loops, stage_configs)
from fcmae.sparse.layout import SparseLayout  # noqa: E402

SMS, SCHEDULERS, CLOCK_HZ, HBM_BYTES_S = 132, 4, 1.98e9, 4.8e12
KERNEL = 7
MAX_WARPS_PER_SM, MAX_PROGRAMS_PER_SM, REGISTERS_PER_SM = 64, 32, 65536


def occupancy(registers: int, warps: int) -> int:
    """Programs resident on one SM at once (registers, warp slots and program slots; shared memory is not
    the limit here)."""
    by_regs = REGISTERS_PER_SM // max(1, registers * 32 * warps)
    return max(1, min(by_regs, MAX_WARPS_PER_SM // warps, MAX_PROGRAMS_PER_SM))


def issue_floor_s(per_warp: float, warps: int, programs: int, registers: int) -> float:
    resident = occupancy(registers, warps)
    waves = math.ceil(programs / (SMS * resident))
    spread = per_warp * warps * programs / (SMS * SCHEDULERS * CLOCK_HZ)
    serial = per_warp * waves / CLOCK_HZ
    return max(spread, serial)


def column_activity(halo: torch.Tensor, tile: int) -> list[float]:
    """Share of active halo sites in each halo column over every (tile, output row, kernel row): what a
    program of either kernel reads for one output row and one kernel row."""
    side = tile + KERNEL - 1
    active = (halo >= 0).view(-1, side, side).float()
    rows = torch.stack([active[:, y + ky] for y in range(tile) for ky in range(KERNEL)], 1)
    return rows.mean((0, 1)).tolist()


def launch_cost(cfg: KernelConfig, programs: int, trips: int, activity: list[float]) -> dict:
    """One loop, ``trips`` times a program; each halo-site branch in it counted at its column's activity."""
    compiled, warps = compile_kernel(cfg, 90)
    loops, total = sass_loops(compiled.asm["cubin"])
    assert len(loops) == 1, f"{cfg}: expected one loop, found {len(loops)}"
    loop = loops[0]
    skips = halo_skips(compiled.asm["cubin"], loop)
    untraced = sum(s.column is None for s in skips)
    expected = loop.instructions - sum(s.instructions * (1 - activity[s.column]) for s in skips if s.column is not None)
    resources, _ = compile_config(cfg, 90, compiled)  # the same binary, read by ptxas
    per_warp = expected * trips + (total - loop.instructions)  # the straight-line code once
    return {"loop_instructions": loop.instructions, "expected_loop_instructions": expected,
            "skips": len(skips), "untraced_skips": untraced, "trips": trips, "per_warp": per_warp, "warps": warps,
            "programs": programs, "registers": resources.registers,
            "issue_s": issue_floor_s(per_warp, warps, programs, resources.registers)}


def stage_costs(model: str, batch: int, img_size: int, mask_ratio: float, dtype: str, seed: int = 0) -> list[dict]:
    v = get_variant(f"convnextv2_{model}")
    grid = img_size // 32
    mask = random_mask(batch, grid * grid, mask_ratio, generator=torch.Generator().manual_seed(seed))
    layout = SparseLayout.from_mask(mask, (grid, grid), 4, None)
    elem = 2 if dtype == "bf16" else 4
    rows_out = []
    for stage, ((tile, reach), channels, depth) in enumerate(zip(STAGE_TILES, v.dims, v.depths)):
        tiles_of = layout.tiles(stage)
        tiles = tiles_of.num_tiles
        activity = column_activity(tiles_of.halo, tile)
        rows = tiles * tile * tile
        canvas = batch * (grid * tile) ** 2
        fwd_cfg, wg_cfg = stage_configs(tile, reach, channels, dtype)
        blocks = math.ceil(channels / fwd_cfg.block_c)
        fwd = launch_cost(fwd_cfg, tiles * tile * blocks, KERNEL, activity)  # a program per tile row and block
        plan = k.wgrad_plan(tiles, channels, tile, torch.device("cuda"), sms=SMS, pairs=wg_cfg.pairs)
        wgrad = launch_cost(wg_cfg, plan.chunks * KERNEL * blocks, math.ceil(plan.rows / plan.chunks), activity)
        wgrad["chunks"] = plan.chunks
        row_bytes, canvas_bytes = rows * channels * elem, canvas * channels * elem
        fwd["memory_s"] = 2 * row_bytes / HBM_BYTES_S  # read x, write y
        # x and grad; the partial sums written, then read by the sum over chunks
        wgrad["memory_s"] = (2 * row_bytes + 2 * plan.chunks * TAPS * channels * 4) / HBM_BYTES_S
        tile_floor = 2 * max(fwd["issue_s"], fwd["memory_s"]) + max(wgrad["issue_s"], wgrad["memory_s"])
        canvas_floor = (8 * canvas_bytes + 8 * row_bytes) / HBM_BYTES_S
        rows_out.append({"stage": stage, "channels": channels, "depth": depth, "tile": tile, "tiles": tiles,
                         "activity": activity, "forward": fwd, "wgrad": wgrad, "tile_floor_s": tile_floor,
                         "canvas_floor_s": canvas_floor})
    return rows_out


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="base")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--mask-ratio", type=float, default=0.6)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--seed", type=int, default=0, help="of the masks the activity is read from")
    p.add_argument("--json", help="write the numbers here too")
    args = p.parse_args()
    start = time.time()
    stages = stage_costs(args.model, args.batch, args.img_size, args.mask_ratio, args.dtype, args.seed)
    print(f"{args.model}, batch {args.batch}, {args.img_size} px, mask {args.mask_ratio:g}, {args.dtype}; sm_90 at "
          f"{CLOCK_HZ / 1e9:.2f} GHz x {SMS} SMs x {SCHEDULERS} issue/cycle, {HBM_BYTES_S / 1e12:.1f} TB/s; "
          "one block's depthwise conv, us\n")
    print("| stage | C | tiles | kernel | loop (instr/warp: all, expected) | trips | programs | regs | issue floor | "
          "memory floor | issue/memory |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in stages:
        for name, c in (("forward (x2: input grad)", s["forward"]), ("weight grad", s["wgrad"])):
            print(f"| {s['stage']} | {s['channels']} | {s['tiles']} | {name} | {c['loop_instructions']}, "
                  f"{c['expected_loop_instructions']:.0f} | {c['trips']} | {c['programs']} | {c['registers']} | "
                  f"{us(c['issue_s'])} | {us(c['memory_s'])} | {c['issue_s'] / c['memory_s']:.1f}x |")
        if s["forward"]["untraced_skips"] or s["wgrad"]["untraced_skips"]:
            print(f"| {s['stage']} | | | (branches not traced to a halo column, counted as always run: "
                  f"{s['forward']['untraced_skips']}, {s['wgrad']['untraced_skips']}) |")
    print("\n| stage | blocks | tile path floor (fwd + input grad + weight grad) | canvas path memory floor | "
          "tile / canvas | per step, tile path | per step, canvas |")
    print("|---|---|---|---|---|---|---|")
    tile_total = canvas_total = 0.0
    for s in stages:
        tile_total += s["tile_floor_s"] * s["depth"]
        canvas_total += s["canvas_floor_s"] * s["depth"]
        print(f"| {s['stage']} | {s['depth']} | {us(s['tile_floor_s'])} | {us(s['canvas_floor_s'])} | "
              f"{s['tile_floor_s'] / s['canvas_floor_s']:.2f}x | {us(s['tile_floor_s'] * s['depth'])} | "
              f"{us(s['canvas_floor_s'] * s['depth'])} |")
    print(f"\nper training step, all blocks: tile path >= {tile_total * 1e3:.2f} ms, canvas path >= "
          f"{canvas_total * 1e3:.2f} ms ({time.time() - start:.0f} s to compile and read)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "stages": stages, "tile_ms": tile_total * 1e3,
                       "canvas_ms": canvas_total * 1e3}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

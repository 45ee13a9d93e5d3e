"""A static cost model of the tile kernels, read without a GPU (#38, #49): each launch configuration is
compiled for sm_90 as the JIT specialises it, its SASS disassembled (the ``nvdisasm`` in Triton's
wheel), and for one model at one batch each launch gets four floors, the largest its estimate:

- **issue**: the hot loop's instructions times its trip count times the programs (the share of a masked
  halo site's instructions that runs, where a branch skips them, from the app's own masks at the ratio);
- **HBM**: the bytes the launch must move at least once;
- **L2**: the bytes its loads ask of L2 (every trip's loads, each halo site as often as programs read it;
  L1 hits would make it less, so this is the pessimistic side of the L2 floor);
- **latency**: one program's own chain, walked through the loop's SASS in issue order
  (:func:`fcmae.sparse.kernel_resources.load_traffic`: a use of a load still in flight waits until it
  lands), times its trips, times the waves the launch needs at the occupancy its registers allow
  (allocated 8 a thread at a time). A loop that loads a site and uses it at once waits a full memory
  latency per site; one that issues its loads together waits once a trip.

Around the launches, the glue the op runs (:func:`fcmae.sparse.triton_dwconv.glue_launches`: small
copies and sums), each at least ``LAUNCH_S``. Beside it all, the canvas path's HBM floor (scatter to a
zero canvas, cuDNN's conv, gather back; the same for the input grad; a weight grad reading two
canvases), the figure the tile path must beat.

Assumed machine (state it with any number quoted): an H200 SXM (the H100's SMs), 132 SMs, 4 warp
schedulers each issuing at most one instruction a cycle, 1.98 GHz, 64 resident warps, 32 resident
programs and 64K registers per SM, 4.8 TB/s of HBM, 5.5 TB/s from L2 to the SMs (the low end of
5.5-7.5), a memory latency of 500 cycles (``--latency``; 300-600 measured on Hopper from L2 to HBM), a
small kernel's launch at 2 us. These are floors, each: the time is at least their maximum.

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
                                           compile_kernel, halo_skips, load_traffic, sass_loops, stage_configs)
from fcmae.sparse.layout import SparseLayout  # noqa: E402
from fcmae.sparse.row_kernels import forward_loop, rows_a_program  # noqa: E402
from fcmae.sparse.wgrad_kernels import HALO_ROW_AT  # noqa: E402

SMS, SCHEDULERS, CLOCK_HZ, HBM_BYTES_S, L2_BYTES_S = 132, 4, 1.98e9, 4.8e12, 5.5e12
LATENCY_CYCLES, LAUNCH_S = 500.0, 2e-6
KERNEL = 7


def column_activity(halo: torch.Tensor, tile: int, halo_rows: bool = False) -> list[float]:
    """Share of active halo sites in each halo column over every (tile, output row, kernel row): what a
    program of either kernel reads for one output row and one kernel row; with ``halo_rows``, over every
    (tile, halo row): what a weight-grad program of a halo row reads a trip."""
    side = tile + KERNEL - 1
    active = (halo >= 0).view(-1, side, side).float()
    if halo_rows:
        return active.mean((0, 1)).tolist()
    rows = torch.stack([active[:, y + ky] for y in range(tile) for ky in range(KERNEL)], 1)
    return rows.mean((0, 1)).tolist()


class Binary:
    """One configuration compiled for sm_90: its loop, registers and warps."""

    def __init__(self, cfg: KernelConfig):
        self.cfg = cfg
        self.compiled, self.warps = compile_kernel(cfg, 90)
        self.cubin = self.compiled.asm["cubin"]
        loops, self.total = sass_loops(self.cubin)
        assert len(loops) == 1, f"{cfg}: expected one loop, found {len(loops)}"
        self.loop = loops[0]
        self.registers = compile_config(cfg, 90, self.compiled)[0].registers  # the same binary, read by ptxas
        self.resident = k.resident_programs(self.registers, self.warps)


def l2_bytes_per_trip(cfg: KernelConfig, activity: list[float]) -> float:
    """Bytes one program's trip asks of L2, counted from the kernels' structure: every active halo site of
    the kernel row (a predicated load of a masked site asks nothing), each a channel block of ``elem``
    bytes; the weight grad's tile row of grads too; each halo index one 32-byte sector. The fp32 weights
    (``k * k * C`` x 4 bytes, the same for every program on an SM) are taken as L1 hits."""
    elem = 2 if cfg.dtype == "bf16" else 4
    sites = sum(activity) * cfg.block_c * elem + len(activity) * 32
    if cfg.kernel != "wgrad":
        return sites
    if cfg.tile in HALO_ROW_AT:  # a tile's grads, the rows that pair with the program's halo row (t k of t (t + k - 1))
        return sites + cfg.tile * KERNEL / (cfg.tile + KERNEL - 1) * cfg.tile * cfg.block_c * elem
    return sites + cfg.tile * cfg.block_c * elem  # a tile row's grads


def launch_cost(binary: Binary, programs: int, trips: int, activity: list[float], latency: float,
                peeled: int = 0, l2_trips: int | None = None) -> dict:
    """One loop, ``trips`` times a program (and ``peeled`` trips of it written out after it, counted in the
    straight-line code, each waiting on memory once); the issue, L2 and latency floors (HBM is the
    caller's). The L2 bytes are ``l2_trips`` (default ``trips``) times :func:`l2_bytes_per_trip`'s."""
    loop, warps = binary.loop, binary.warps
    skips = halo_skips(binary.cubin, loop)
    untraced = sum(s.column is None for s in skips)
    expected = loop.instructions - sum(s.instructions * (1 - activity[s.column]) for s in skips if s.column is not None)
    straight = binary.total - loop.instructions  # the straight-line code, once a program
    per_warp = expected * trips + straight
    waves = math.ceil(programs / (SMS * binary.resident))
    spread = per_warp * warps * programs / (SMS * SCHEDULERS * CLOCK_HZ)
    traffic = load_traffic(binary.cubin, loop, activity, latency)
    l2 = l2_bytes_per_trip(binary.cfg, activity)
    # the first loads and the last stores: one latency; a peeled trip's loads: one more each
    chain = traffic.cycles * trips + straight + latency * (1 + peeled)
    return {"loop_instructions": loop.instructions, "expected_loop_instructions": expected,
            "skips": len(skips), "untraced_skips": untraced, "trips": trips, "per_warp": per_warp, "warps": warps,
            "programs": programs, "registers": binary.registers, "resident": binary.resident, "waves": waves,
            "round_trips_per_trip": traffic.round_trips, "l2_bytes": l2 * (l2_trips or trips) * programs,
            "in_flight_per_sm": traffic.in_flight * warps * min(binary.resident, math.ceil(programs / SMS)),
            "issue_s": max(spread, per_warp * waves / CLOCK_HZ),
            "peeled": peeled, "l2_s": l2 * (l2_trips or trips) * programs / L2_BYTES_S,
            "latency_s": waves * chain / CLOCK_HZ}


def finish(cost: dict, memory_s: float) -> dict:
    cost["memory_s"] = memory_s
    cost["time_s"] = max(cost["issue_s"], memory_s, cost["l2_s"], cost["latency_s"])
    cost["bound"] = max(("issue", cost["issue_s"]), ("HBM", memory_s), ("L2", cost["l2_s"]),
                        ("latency", cost["latency_s"]), key=lambda kv: kv[1])[0]
    return cost


def stage_costs(model: str, batch: int, img_size: int, mask_ratio: float, dtype: str, seed: int = 0,
                latency: float = LATENCY_CYCLES) -> list[dict]:
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
        fwd_bin, wg_bin = Binary(fwd_cfg), Binary(wg_cfg)
        blocks = math.ceil(channels / fwd_cfg.block_c)
        row_bytes, canvas_bytes = rows * channels * elem, canvas * channels * elem
        # a program per tile row and channel block, each trip a halo row read; or per tile, each of the
        # tile's halo rows read once (row_kernels.WHOLE_TILE_AT); read x, write y
        loop, peeled = forward_loop(tile, KERNEL)
        whole = rows_a_program(tile) > 1
        fwd_activity = column_activity(tiles_of.halo, tile, halo_rows=True) if whole else activity
        fwd = finish(launch_cost(fwd_bin, tiles * tile // rows_a_program(tile) * blocks, loop, fwd_activity, latency,
                                 peeled, l2_trips=tile + KERNEL - 1 if whole else KERNEL), 2 * row_bytes / HBM_BYTES_S)
        # the grid the op launches once the first launch has told the registers
        plan = k.wgrad_plan(tiles, channels, tile, torch.device("cuda"), sms=SMS, pairs=wg_cfg.pairs,
                            resident=wg_bin.resident)
        wg_activity = column_activity(tiles_of.halo, tile, halo_rows=tile in HALO_ROW_AT)
        wgrad = launch_cost(wg_bin, plan.chunks * plan.axis * blocks, math.ceil(plan.rows / plan.chunks),
                            wg_activity, latency)
        wgrad["chunks"], wgrad["axis"] = plan.chunks, plan.axis
        partials = plan.chunks * plan.slots
        # x and grad; the partial sums written (read again by the glue's sum over chunks)
        finish(wgrad, (2 * row_bytes + partials * (TAPS + 1) * channels * 4) / HBM_BYTES_S)
        glue = [{"name": name, "bytes": nbytes, "time_s": max(LAUNCH_S, nbytes / HBM_BYTES_S)}
                for name, nbytes in k.glue_launches(channels, partials, TAPS)]
        glue_s = sum(g["time_s"] for g in glue)
        tile_time = 2 * fwd["time_s"] + wgrad["time_s"] + glue_s
        canvas_floor = (8 * canvas_bytes + 8 * row_bytes) / HBM_BYTES_S
        rows_out.append({"stage": stage, "channels": channels, "depth": depth, "tile": tile, "tiles": tiles,
                         "activity": activity, "forward_activity": fwd_activity, "forward": fwd, "wgrad": wgrad,
                         "glue": glue, "glue_s": glue_s,
                         "tile_time_s": tile_time, "canvas_floor_s": canvas_floor})
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
    p.add_argument("--latency", type=float, default=LATENCY_CYCLES, help="memory latency in cycles (300-600)")
    p.add_argument("--json", help="write the numbers here too")
    args = p.parse_args()
    start = time.time()
    stages = stage_costs(args.model, args.batch, args.img_size, args.mask_ratio, args.dtype, args.seed, args.latency)
    print(f"{args.model}, batch {args.batch}, {args.img_size} px, mask {args.mask_ratio:g}, {args.dtype}; sm_90 at "
          f"{CLOCK_HZ / 1e9:.2f} GHz x {SMS} SMs x {SCHEDULERS} issue/cycle, HBM {HBM_BYTES_S / 1e12:.1f} TB/s, L2 "
          f"{L2_BYTES_S / 1e12:.1f} TB/s, latency {args.latency:.0f} cycles, a launch >= {LAUNCH_S * 1e6:.0f} us; "
          "one block's depthwise conv, us\n")
    print("| stage | C | kernel | loop (instr/warp: all, expected) | trips | programs | regs (resident/SM) | "
          "waits/trip | issue | HBM | L2 | latency | estimate (bound) | / HBM floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s in stages:
        for name, c in (("forward (x2: input grad)", s["forward"]), ("weight + bias grad", s["wgrad"])):
            print(f"| {s['stage']} | {s['channels']} | {name} | {c['loop_instructions']}, "
                  f"{c['expected_loop_instructions']:.0f} | {c['trips']} | {c['programs']} | {c['registers']} "
                  f"({c['resident']}) | {c['round_trips_per_trip']:.1f} | {us(c['issue_s'])} | {us(c['memory_s'])} | "
                  f"{us(c['l2_s'])} | {us(c['latency_s'])} | {us(c['time_s'])} ({c['bound']}) | "
                  f"{c['time_s'] / c['memory_s']:.1f}x |")
        if s["forward"]["untraced_skips"] or s["wgrad"]["untraced_skips"]:
            print(f"| {s['stage']} | | (branches not traced to a halo column, counted as always run: "
                  f"{s['forward']['untraced_skips']}, {s['wgrad']['untraced_skips']}) |")
    print("\n| stage | blocks | glue launches (us) | tile path a block (2 x fwd + wgrad + glue) | canvas path HBM "
          "floor | tile / canvas | per step, tile path | per step, canvas floor |")
    print("|---|---|---|---|---|---|---|---|")
    tile_total = canvas_total = 0.0
    for s in stages:
        tile_total += s["tile_time_s"] * s["depth"]
        canvas_total += s["canvas_floor_s"] * s["depth"]
        print(f"| {s['stage']} | {s['depth']} | {len(s['glue'])} ({us(s['glue_s'])}) | {us(s['tile_time_s'])} | "
              f"{us(s['canvas_floor_s'])} | {s['tile_time_s'] / s['canvas_floor_s']:.2f}x | "
              f"{us(s['tile_time_s'] * s['depth'])} | {us(s['canvas_floor_s'] * s['depth'])} |")
    worst = max((c["time_s"] / c["memory_s"], s["stage"], name) for s in stages
                for name, c in (("forward", s["forward"]), ("wgrad", s["wgrad"])))
    print(f"\nper training step, all blocks: tile path ~{tile_total * 1e3:.2f} ms (the largest floor of each launch, "
          f"glue included), canvas path >= {canvas_total * 1e3:.2f} ms (HBM alone); the launch furthest from its HBM "
          f"floor: stage {worst[1]} {worst[2]}, {worst[0]:.1f}x ({time.time() - start:.0f} s to compile and read)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "stages": stages, "tile_ms": tile_total * 1e3,
                       "canvas_ms": canvas_total * 1e3}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

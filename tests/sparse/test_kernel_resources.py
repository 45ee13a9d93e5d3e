"""The tile kernels compile for real GPUs without spilling (#29), checked with no GPU: Triton compiles
every launch configuration the encoder can use (all 8 sizes x 4 stages; the image size changes the
number of tiles, not the code) for sm_80 and sm_90, in bf16 and fp32, forward (also the input grad)
and weight grad, and the ``ptxas -v`` bundled with Triton's wheel reports the resources."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="Triton ships with torch's Linux wheels; not on this platform")
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
if not PTXAS.is_file():
    pytest.skip("this Triton has no bundled ptxas", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]

# The compiler must not run in interpreter mode (conftest sets TRITON_INTERPRET=1 for the value tests),
# and Triton reads that when first imported: compile in a fresh interpreter.
SCRIPT = """
import json, sys
from fcmae.sparse.kernel_resources import compile_config, launch_configs
arch = int(sys.argv[1])
rows = []
for cfg, users in launch_configs().items():
    r, _ = compile_config(cfg, arch)
    rows.append([cfg.kernel, cfg.tile, cfg.block_c, cfg.dtype, arch, r.registers, r.spill_stores, users[0]])
json.dump(rows, sys.stdout)
"""


@pytest.mark.slow
def test_every_launch_configuration_compiles_without_spills(tmp_path):
    import json
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    # one compiler process per target, side by side (each compile is single-threaded)
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, arch], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for arch in ("80", "90")]
    rows = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        rows += json.loads(out)
    kinds = {(r[0], r[1]) for r in rows}
    assert kinds == {(k, t) for k in ("forward", "wgrad") for t in (8, 4, 2, 1)}  # every stage, both kernels
    assert {r[3] for r in rows} == {"bf16", "fp32"} and {r[4] for r in rows} == {80, 90}
    spilling = [r for r in rows if r[6] > 0]
    assert not spilling, "spill stores (kernel, tile, BLOCK_C, dtype, sm, registers, bytes, used by): " + \
        "; ".join(map(str, spilling))
    assert all(0 < r[5] <= 255 for r in rows)


def test_launch_configurations_cover_every_size_and_stage():
    from fcmae.models.variants import VARIANTS
    from fcmae.sparse.kernel_resources import launch_configs
    users = [u for us in launch_configs().values() for u in us]
    for name, v in VARIANTS.items():
        for stage in range(4):
            assert f"{name} s{stage} ({v.dims[stage]})" in users


@pytest.mark.slow
def test_the_cost_model_reads_the_loops_and_floors_of_every_stage(tmp_path):
    """benchmarks/kernel_cost.py (#38, #49): each kernel has one loop (the forward: 7 kernel rows, or at 2x2
    tiles 3 iterations of two and one trip after the loop; the weight grad: the tile rows of a chunk) whose
    trips wait on memory about once (the loads issued together, the halo indices one trip ahead), each
    launch's estimate is the largest of its issue, HBM, L2 and latency floors, the L2 bytes are the active
    halo sites counted by hand, the glue around a block is two small launches, and the canvas path's floor
    is the bytes counted by hand."""
    import json
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    out = tmp_path / "cost.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_cost.py"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    stages = report["stages"]
    assert [s["channels"] for s in stages] == [128, 256, 512, 1024] and [s["tile"] for s in stages] == [8, 4, 2, 1]
    for s in stages:
        t = s["tile"]
        assert s["tiles"] == 128 * 19  # base, batch 128, 19 of 49 patches visible at mask 0.6
        fwd, wgrad = s["forward"], s["wgrad"]
        # a program per tile row (one block), at 2x2 a program per tile: (7 // 2) iterations and one trip peeled
        whole = t == 2
        assert (fwd["trips"], fwd["peeled"]) == ((3, 1) if whole else (7, 0))
        assert fwd["programs"] == s["tiles"] * (1 if whole else t)
        # a trip a tile row, or at 2x2 tiles a tile (a halo row a program: 8 programs a chunk, not 7)
        units, axis = (s["tiles"], 8) if t == 2 else (s["tiles"] * t, 7)
        assert wgrad["trips"] * wgrad["chunks"] >= units and wgrad["programs"] == axis * wgrad["chunks"]
        assert wgrad["round_trips_per_trip"] < 2, (s["stage"], wgrad)
        if t >= 4:
            assert fwd["round_trips_per_trip"] < 2, (s["stage"], fwd)
        for c in (fwd, wgrad):
            assert c["skips"] == 0 and c["expected_loop_instructions"] == c["loop_instructions"]  # no branches
            floors = (c["issue_s"], c["memory_s"], c["l2_s"], c["latency_s"])
            assert c["time_s"] == max(floors) and min(floors) > 0
        # the own tile's columns are active in the tile's own rows; the others only where a neighbour is
        activity = s["activity"]
        assert len(activity) == t + 6 and max(activity[:3]) < min(activity[3:3 + t]) <= 1
        # each trip reads a halo row: 7 a program, or the tile's t + 6 once each at 2x2 (the halo rows' activity)
        rows, read = (t + 6, s["forward_activity"]) if whole else (7, activity)
        assert len(read) == t + 6 and (whole or read == activity)
        hand = fwd["programs"] * rows * (sum(read) * s["channels"] * 2 + (t + 6) * 32)
        assert abs(fwd["l2_bytes"] - hand) < 1e-6 * hand
        assert len(s["glue"]) == 2  # the weights rounded and laid out; the partials summed and laid out
        sites = (7 * t) ** 2
        hand = (8 * 128 * sites * s["channels"] * 2 + 8 * s["tiles"] * t ** 2 * s["channels"] * 2) / 4.8e12
        assert abs(s["canvas_floor_s"] - hand) < 1e-12
    assert abs(report["canvas_ms"] - 2.76) < 0.01


def _sass(text: str) -> list[tuple[int, str]]:
    return [(16 * i, line.strip()) for i, line in enumerate(text.strip().splitlines())]


def test_the_latency_walk_counts_a_wait_per_site_loaded_and_used_at_once():
    """The latency side of the cost model (#49), on hand-written SASS with hand-derived answers: a body
    that loads a site and uses it at once waits a full latency per site; the same loads issued together
    wait once; a use of a load issued at the end of the previous trip waits only for what is left of its
    latency; a site load guarded by a tested halo index counts with that column's activity."""
    from fcmae.sparse.kernel_resources import walk_loads
    one_by_one = _sass("""
        LDG.E.64 R2, desc[UR4][R10.64]
        FFMA R20, R2, R3, R20
        LDG.E.64 R4, desc[UR4][R10.64+0x100]
        FFMA R21, R4, R5, R21
        LDG.E.64 R6, desc[UR4][R10.64+0x200]
        FFMA R22, R6, R7, R22
    """)
    t = walk_loads(one_by_one, [], [1.0], latency=100)
    # a load issued in cycle c lands at c + 1 + latency; the use issues then: 3 x (1 + 100 + 1) cycles
    assert t.round_trips == 3 and t.cycles == 3 * 102 and t.loads == 3
    assert t.in_flight == 256  # one 8-byte-a-lane load at a time
    together = _sass("""
        LDG.E.64 R2, desc[UR4][R10.64]
        LDG.E.64 R4, desc[UR4][R10.64+0x100]
        LDG.E.64 R6, desc[UR4][R10.64+0x200]
        FFMA R20, R2, R3, R20
        FFMA R21, R4, R5, R21
        FFMA R22, R6, R7, R22
    """)
    t = walk_loads(together, [], [1.0], latency=100)
    # the loads land at 101, 102, 103; the first use waits from 3 to 101, the others not at all
    assert t.cycles == 104 and abs(t.round_trips - 0.98) < 1e-9 and t.in_flight == 3 * 256
    # the index for the next trip loaded last, tested first (a whole latency: nothing comes between), the site
    # it guards loaded a quarter of the trips (column 0's activity) and used at once: a quarter of a latency
    pipelined = _sass("""
        ISETP.GT.AND P0, PT, R30, -0x1, PT
        @P0 LDG.E.64 R2, desc[UR4][R12.64]
        FFMA R20, R2, R3, R20
        LDG.E R30, desc[UR4][R14.64]
    """)
    t = walk_loads(pipelined, [], [0.25], latency=200)
    assert t.round_trips == 1.25 and t.cycles == 200 + 1 + 0.25 + 0.25 * 200 + 1 + 1, t
    assert t.loads == 2

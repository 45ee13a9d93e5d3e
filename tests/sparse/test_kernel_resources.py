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
    """benchmarks/kernel_cost.py (#38): each kernel has one loop (the forward: 7 kernel rows; the weight
    grad: the tile rows of a chunk), its halo-site branches are traced to their columns, the expected
    loop is what the active share leaves of it, and the canvas path's floor is the bytes counted by hand."""
    import json
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    out = tmp_path / "cost.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_cost.py"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = json.loads(out.read_text())["stages"]
    assert [s["channels"] for s in stages] == [128, 256, 512, 1024] and [s["tile"] for s in stages] == [8, 4, 2, 1]
    for s in stages:
        t = s["tile"]
        assert s["tiles"] == 128 * 19  # base, batch 128, 19 of 49 patches visible at mask 0.6
        fwd, wgrad = s["forward"], s["wgrad"]
        assert fwd["trips"] == 7 and fwd["programs"] == s["tiles"] * t  # a program per tile row (one block)
        assert wgrad["trips"] * wgrad["chunks"] >= s["tiles"] * t and wgrad["programs"] == 7 * wgrad["chunks"]
        for c in (fwd, wgrad):
            # a branch per halo column, less the few ptxas predicates instead; every one traced
            assert t + 6 - 4 <= c["skips"] <= t + 6 and c["untraced_skips"] == 0, c
            assert 0 < c["expected_loop_instructions"] < c["loop_instructions"]
        # the own tile's columns are active in the tile's own rows; the others only where a neighbour is
        activity = s["activity"]
        assert len(activity) == t + 6 and max(activity[:3]) < min(activity[3:3 + t]) <= 1
        sites = (7 * t) ** 2
        hand = (8 * 128 * sites * s["channels"] * 2 + 8 * s["tiles"] * t ** 2 * s["channels"] * 2) / 4.8e12
        assert abs(s["canvas_floor_s"] - hand) < 1e-12

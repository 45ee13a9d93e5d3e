"""The prepared device run (benchmarks/gpu_check.sh) works before it meets a GPU: --dry-run runs every
stage at toy sizes on the CPU and checks the rules one `device` call imposes."""
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_device_run_dry_runs_every_stage_within_the_calls_rules(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out)}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=840)
    log = (out / "log.txt").read_text() if (out / "log.txt").is_file() else ""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + log[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["env", "correctness", "selftest", "step_eager", "step_compiled",
                                                       "loader", "e2e", "host_syncs", "memory", "roofline"]
    assert all(s["status"] == "ok" for s in summary["stages"]), summary["stages"]
    assert summary["limits_s"] <= 540 and summary["dry_run"] is True
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "summary.json"]
    by_stage = {s["stage"]: s for s in summary["stages"]}
    assert by_stage["selftest"]["results"]["kernel"] == "tiles"
    kernels = {r["variant"]: r["dwconv"] for r in by_stage["step_eager"]["results"]["results"]}
    assert kernels == {"sparse": "canvas", "sparse-canvas": "canvas"}  # on the CPU the app picks the canvas
    # the profile stage (issue 48): the compiled steps split by op class, the roofline's prediction beside them
    split = summary["step_split"]
    assert set(split) == {"fcmae", "mae"}
    for name in ("fcmae", "mae"):
        assert split[name]["profiled_total_ms"] > 0 and sum(c["launches"] for c in split[name]["profiled_ms"].values()) > 0
        assert split[name]["roofline_fused_total_ms"] > 0 and "GEMM" in split[name]["roofline_fused"]
    assert "GRN" in split["fcmae"]["roofline_fused"]
    (memory,) = by_stage["memory"]["results"]  # the plan beside the measured peak (on the GPU: the allocator's)
    assert memory["plan"]["peak"] > 0 and memory["measured"]["peak"] > 0

"""The step roofline (benchmarks/step_roofline.py, issue 48): the fusion rule on a hand-built op list, a
small traced step in the fast tier (no full-size fp32 tensor between GRN / LayerNorm kernels in bf16), and in
the full set the issue's targets for FCMAE-B against MAE ViT-B/16 at batch 128 on the H100 model."""
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _roofline():
    """The benchmark as a module (once per process: it registers its attention op with torch.library)."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    return importlib.import_module("step_roofline")


def test_the_fused_rule_reads_each_outside_tensor_once_and_writes_what_is_used_later():
    r = _roofline()
    Op = r.Op
    # GEMM writes A (100 B); x = f(A) (B, 100); y = g(B, A) (C, 100); GEMM reads C; B is read again later
    # (a tensor saved for the backward): the chain reads A once, writes B and C
    ops = [Op("mm", "GEMM", 10.0, [("w", 50)], [("A", 100)], "bf16", "x", False),
           Op("gelu", "GELU", 1.0, [("A", 100)], [("B", 100)], None, "x", False),
           Op("mul", "elementwise", 1.0, [("B", 100), ("A", 100)], [("C", 100)], None, "x", False),
           Op("mm", "GEMM", 10.0, [("C", 100), ("w", 50)], [("D", 100)], "bf16", "x", False),
           Op("gelu_backward", "GELU", 1.0, [("B", 100), ("D", 100)], [("E", 100)], None, "x", True)]
    a, b = r.rule_a(ops), r.rule_b(ops)
    assert [k.bytes for k in a] == [150, 200, 300, 250, 300]
    assert len(b) == 4 and b[1].bytes == 100 + 100 + 100  # A read once; B (read later) and C written
    assert b[1].flops == 2.0 and b[1].classes == pytest.approx({"GELU": 0.4, "elementwise": 0.6})
    gpu = r.GPUS["h100"]
    assert r.kernel_time(b[1], gpu) == pytest.approx(300 / gpu["hbm"])
    assert r.kernel_time(r.Kernel("GEMM", 989e12, 0, "bf16", "x"), gpu) == pytest.approx(1.0)


def test_a_small_traced_step_keeps_grn_and_layer_norm_tensors_in_bf16(capsys):
    r = _roofline()
    ops = r.trace_step(r.fcmae_step("convnextv2_atto", 2, 64, 0.5, "sparse", "tiles"), "bf16")
    assert {o.cls for o in ops} >= {"GEMM", "dwconv", "LayerNorm", "GRN", "GELU", "optimizer"}
    rows0 = 2 * 2 * 64  # visible patches x 64 sites at stage 0
    # the sparse encoder's (the decoder is a dense block in its official form)
    big = [o for o in ops if o.cls in ("GRN", "LayerNorm") and "sparse/" in o.where and o.fp32_out >= rows0 * 40 // 2]
    assert [o for o in ops if o.cls == "GRN" and "sparse/" in o.where]
    assert not big, [(o.name, o.where, o.fp32_out) for o in big][:5]
    res = r.main(["--model", "atto", "--batch", "2", "--img", "64", "--json", "/dev/null"])
    for rule in ("a", "b"):
        assert res["fcmae"][rule]["total"]["ms"] > 0 and res["mae"][rule]["total"]["ms"] > 0
    assert res["fcmae"]["b"]["total"]["gb"] < res["fcmae"]["a"]["total"]["gb"]  # fusing never adds traffic
    assert res["fcmae"]["a"]["total"]["gflop"] == pytest.approx(res["fcmae"]["b"]["total"]["gflop"])
    assert "FCMAE / MAE" in capsys.readouterr().out


@pytest.mark.slow
def test_fcmae_base_against_mae_at_batch_128_meets_the_issue_s_targets():
    """Issue 48's targets on the H100 model: FCMAE-B / MAE ViT-B <= 1.0 fused (eager's saved tensors
    kept) and <= 2.0 with every op its own kernel (before: 1.35 and 3.16)."""
    r = _roofline()
    res = r.main(["--model", "base", "--batch", "128", "--gpu", "h100"])
    assert res["ratio"]["b"] <= 1.0, res["ratio"]
    assert res["ratio"]["a"] <= 2.0, res["ratio"]

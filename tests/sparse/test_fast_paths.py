"""What the fast paths promise: no graph breaks or host syncs in the sparse forward,
torch.compile and bf16 autocast agree with eager fp32, and grads keep parameter strides
(DDP's bucket-view contract)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from fcmae import create_fcmae
from fcmae.models.masking import random_mask

from conftest import rel_err

ROOT = Path(__file__).resolve().parents[2]


def _model(backend="sparse", grn_stats="sample"):
    torch.manual_seed(0)
    model = create_fcmae("convnextv2_atto", backend=backend, grn_stats=grn_stats, decoder_embed_dim=64)
    with torch.no_grad():  # GRN starts at zero; give it values so it is exercised
        for n, p in model.named_parameters():
            if "grn" in n:
                p.copy_(torch.linspace(-0.5, 0.5, p.numel()).view_as(p))
    return model


def _loss_and_grads(model, fn, imgs, mask):
    model.zero_grad(set_to_none=True)
    loss, pred = fn(imgs, mask)
    loss.backward()
    return loss.detach(), pred.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_sparse_grads_have_the_parameters_strides():
    model = _model()
    imgs = torch.randn(2, 3, 64, 96)
    loss, _, _ = model(imgs, random_mask(2, 6, 0.5), visible_per_sample=3)
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad.stride() == p.stride(), n


@pytest.mark.slow
@pytest.mark.parametrize("grn_stats", ["sample", "batch"])
def test_fullgraph_trace_has_no_graph_break_and_matches_eager(grn_stats):
    """fullgraph=True fails on any graph break, e.g. ``.item()`` or a data-dependent
    ``nonzero``: with a static visible count the forward has no host sync."""
    model = _model(grn_stats=grn_stats)
    imgs = torch.randn(2, 3, 64, 96)
    mask = random_mask(2, 6, 0.5)

    def step(imgs, mask):
        loss, pred, _ = model(imgs, mask, visible_per_sample=3)
        return loss, pred

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=False)
    le, pe, ge = _loss_and_grads(model, step, imgs, mask)
    lc, pc, gc = _loss_and_grads(model, compiled, imgs, mask)
    assert rel_err(pc, pe) < 1e-5 and abs(lc - le) < 1e-5
    for n in ge:
        assert rel_err(gc[n], ge[n]) < 1e-5, n


def test_bf16_autocast_sparse_matches_dense_and_fp32():
    sparse, dense = _model("sparse"), _model("dense")
    imgs = torch.randn(4, 3, 64, 96)
    mask = random_mask(4, 6, 0.5)
    with torch.no_grad():
        ref = sparse.forward_encoder(imgs, mask, 3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fs = sparse.forward_encoder(imgs, mask, 3)
            fd = dense.forward_encoder(imgs, mask, 3)
            loss, _, _ = sparse(imgs, mask, visible_per_sample=3)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # bf16 has an 8-bit mantissa: agreement to a few 1e-3 is what a correct bf16 path gives.
    assert rel_err(fs.float(), ref) < 3e-2
    assert rel_err(fs.float(), fd.float()) < 3e-2
    masked = mask.view(4, 1, 2, 3).bool().expand_as(fs)
    assert (fs[masked] == 0).all() and (fs[~masked] != 0).any()  # masked sites stay exactly zero


def test_benchmark_script_reports_every_variant_with_ratios(tmp_path):
    spec = importlib.util.spec_from_file_location("step_time", ROOT / "benchmarks" / "step_time.py")
    step_time = importlib.util.module_from_spec(spec)
    sys.modules["step_time"] = step_time  # dataclasses look their module up
    spec.loader.exec_module(step_time)
    out = tmp_path / "bench.json"
    results = step_time.main(["--img-sizes", "64", "--batch-sizes", "2", "--mask-ratios", "0.5",
                              "--variants", "sparse", "dense", "unmasked", "--warmup", "1",
                              "--repeats", "3", "--json", str(out)])
    by_variant = {r.variant: r for r in results}
    assert set(by_variant) == {"sparse", "dense", "unmasked"}
    assert by_variant["dense"].step_ratio == 1.0
    for r in results:
        assert len(r.samples["encoder"]) == 3 and len(r.samples["step"]) == 3
        assert r.step_ms > 0 and r.step_img_s == pytest.approx(2 / r.step_ms * 1e3)
    import json
    data = json.loads(out.read_text())
    assert {r["variant"] for r in data["results"]} == set(by_variant)


@pytest.mark.slow
def test_step_time_times_the_mae_reference_with_its_flops_and_mfu(tmp_path):
    spec = importlib.util.spec_from_file_location("step_time", ROOT / "benchmarks" / "step_time.py")
    step_time = importlib.util.module_from_spec(spec)
    sys.modules["step_time"] = step_time
    spec.loader.exec_module(step_time)
    out = tmp_path / "bench.json"
    results = step_time.main(["--batch-sizes", "1", "--variants", "sparse", "dense", "mae", "--warmup", "1",
                              "--repeats", "1", "--peak-tflops", "2", "--json", str(out)])
    by_variant = {r.variant: r for r in results}
    # MAE ViT-B/16 at 224 px, by hand: 12 encoder blocks on 49 tokens, 8 decoder blocks on 196,
    # 2 FLOPs per multiply-add of every Linear and of the patch embedding; attention's
    # matmuls counted or not (torch's counter misses fused attention on some backends)
    linears = (2 * 49 * 12 * (768 * 2304 + 768 * 768 + 2 * 768 * 3072) + 2 * 196 * 768 * 768
               + 2 * 49 * 768 * 512 + 2 * 196 * 8 * (512 * 1536 + 512 * 512 + 2 * 512 * 2048) + 2 * 196 * 512 * 768)
    attention = 12 * 2 * 2 * 49 * 49 * 768 + 8 * 2 * 2 * 196 * 196 * 512
    mae = by_variant["mae"].fwd_gflop_per_img * 1e9
    assert min(abs(mae - linears), abs(mae - linears - attention)) / linears < 0.01, (mae, linears, attention)
    assert by_variant["sparse"].fwd_gflop_per_img < 0.7 * by_variant["dense"].fwd_gflop_per_img
    for r in results:
        assert r.mfu == pytest.approx(3 * r.fwd_gflop_per_img * 1e9 * r.step_img_s / 2e12)
    assert {r["variant"] for r in json.loads(out.read_text())["results"]} == {"sparse", "dense", "mae"}


def test_loader_rate_benchmark_measures_after_the_prefetch_buffer(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("loader_rate", ROOT / "benchmarks" / "loader_rate.py")
    loader_rate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader_rate)
    out = tmp_path / "rate.json"
    assert loader_rate.main(["--make-jpegs", "40", "--cache", str(tmp_path / "jpegs"), "--workers", "0,1",
                             "--batch", "2", "--img-size", "64", "--batches", "3", "--json", str(out),
                             "--decode", "cpu,gpu", "--device", "cpu", "--sources", "folder,shards"]) == 0
    rows = json.loads(out.read_text())
    assert [(r["source"], r["pipeline"], r["workers"]) for r in rows] == [
        (s, p, w) for s in ("folder", "shards") for p in ("cpu", "gpu") for w in (0, 1)]
    assert [r["warmup_batches"] for r in rows] == [2, 1 * 4 + 2] * 4  # the prefetch buffer is not timed
    assert (tmp_path / "jpegs_shards" / "index.json").is_file()
    assert all(r["images_per_s"] > 0 for r in rows)
    assert "ratios to the first" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="need"):  # too few images for the warm-up and the timed window
        loader_rate.main(["--root", str(tmp_path / "jpegs"), "--workers", "2", "--batch", "8", "--batches", "3"])


@pytest.mark.slow
def test_pretrain_rate_benchmark_times_a_real_run_after_the_prefetch_buffer(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("pretrain_rate", ROOT / "benchmarks" / "pretrain_rate.py")
    pretrain_rate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretrain_rate)
    # the window starts after warm-up + one prefetch buffer and spans at least three buffers
    assert pretrain_rate.window_for(workers=15, warmup_steps=20, window=30) == (80, 260)
    assert pretrain_rate.window_for(workers=0, warmup_steps=2, window=30) == (6, 36)
    out = tmp_path / "e2e.json"
    rows = pretrain_rate.main(["--make-jpegs", "80", "--cache", str(tmp_path / "jpegs"), "--out", str(tmp_path / "runs"),
                               "--model", "atto", "--batch", "4", "--img-size", "64", "--workers", "1",
                               "--warmup-steps", "2", "--window", "12", "--step-only", "--step-repeats", "2",
                               "--device", "cpu", "--json", str(out)])
    assert [(r["measure"], r.get("pipeline")) for r in rows] == [("end_to_end", "cpu"), ("end_to_end", "gpu"),
                                                                 ("step_only", None)]
    assert json.loads(out.read_text()) == rows
    assert all(r["images_per_s"] > 0 for r in rows) and rows[0]["window_steps"] == [6, 18]
    steps = [json.loads(line)["step"] for line in (tmp_path / "runs/decode-gpu/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 19))  # the real app ran, logging every step
    assert "of step-only" in capsys.readouterr().out

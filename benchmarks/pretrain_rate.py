#!/usr/bin/env python
"""End-to-end images/s of a real ``fcmae-pretrain`` run on a folder of JPEGs, per input pipeline,
next to the step-only rate of the same model measured in the same invocation.

    python benchmarks/pretrain_rate.py --root /data/imagenet/train --model base --batch 128 \\
        --workers 15 --decode cpu,gpu --compile --step-only --json e2e.json
    python benchmarks/pretrain_rate.py --make-jpegs 400 --model atto --batch 8 --img-size 64 --workers 1

Each pipeline runs the app in its own process (``python -m fcmae.pretrain data=folder ...``,
logging every step) and the rate is read from its ``metrics.jsonl`` timestamps over a window that
starts after the warm-up (``--warmup-steps``, compilation included) plus one full prefetch buffer
(workers x 4 batches: what the loader stocked while the model compiled would otherwise count as
free) and lasts at least three prefetch buffers (``--window``, raised if needed). The window stays
inside the first epoch: epoch ends checkpoint. ``--step-only`` adds ``benchmarks/step_time.py``'s
full training step on synthetic tensors (no loader): the ceiling the end-to-end rate is held to.
The JSON is rewritten after each measurement, so a run that is cut off keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from loader_rate import PREFETCH, make_jpegs  # noqa: E402

from fcmae.data.sources import scan_folder  # noqa: E402


def window_for(workers: int, warmup_steps: int, window: int) -> tuple[int, int]:
    """``(first, last)`` logged steps of the timed window."""
    buffer = max(workers, 1) * PREFETCH
    first = warmup_steps + buffer
    return first, first + max(window, 3 * buffer)


def rate_from_metrics(rows: list[dict], first: int, last: int, images_per_step: int) -> float:
    by_step = {r["step"]: r for r in rows if "time" in r}
    if first not in by_step or last not in by_step:
        raise SystemExit(f"metrics.jsonl lacks step {first} or {last}; did the run stop early?")
    return (last - first) * images_per_step / (by_step[last]["time"] - by_step[first]["time"])


def run_app(root: Path, out: Path, args, decode: str, steps: int) -> list[dict]:
    overrides = [
        "data=folder", f"data.root={root}", f"data.decode={decode}", f"data.batch_size={args.batch}",
        f"data.num_workers={args.workers}", f"data.img_size={args.img_size}", f"model=convnextv2_{args.model}",
        f"trainer.max_steps={steps}", "trainer.epochs=1", "trainer.log_every=1", f"trainer.vis_every={10 * steps}",
        f"trainer.ckpt_every={10 * steps}", f"trainer.compile={'true' if args.compile else 'false'}",
        f"trainer.device={args.device}", "trainer.progress=log", "logger=none", f"hydra.run.dir={out}", "resume=never",
        *args.override,
    ]
    shutil.rmtree(out, ignore_errors=True)  # a fresh run each time, never a resumed one
    subprocess.run([sys.executable, "-m", "fcmae.pretrain", *overrides], cwd=ROOT, check=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_only_rate(args) -> float:
    from step_time import run_config
    from fcmae.models.masking import num_visible
    dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    cfg = {"model": args.model, "batch": args.batch, "img_size": args.img_size, "mask_ratio": 0.6, "dtype": dtype,
           "device": torch.device(args.device), "visible": num_visible((args.img_size // 32) ** 2, 0.6)}
    variant = "sparse+compile" if args.compile else "sparse"
    (result,) = run_config(cfg, [variant], args.step_warmup, args.step_repeats, lambda s: print(s, flush=True))
    return result.step_img_s


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, help="a folder of images (searched recursively)")
    p.add_argument("--make-jpegs", type=int, metavar="N", help="make N 500x375 JPEGs in --cache and use them")
    p.add_argument("--cache", type=Path, default=Path("outputs/loader_rate_jpegs"))
    p.add_argument("--out", type=Path, default=Path("outputs/pretrain_rate"), help="run directories go here")
    p.add_argument("--model", default="atto")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--decode", default="cpu,gpu", help="comma-separated pipelines: cpu, gpu")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="trainer.compile=true (else false)")
    p.add_argument("--warmup-steps", type=int, default=20, help="untimed steps before the prefetch buffer")
    p.add_argument("--window", type=int, default=30, help="timed steps, at least three prefetch buffers")
    p.add_argument("--step-only", action="store_true", help="also time the step alone (benchmarks/step_time.py)")
    p.add_argument("--step-warmup", type=int, default=5)
    p.add_argument("--step-repeats", type=int, default=20)
    p.add_argument("--override", action="append", default=[], help="another fcmae-pretrain override (repeatable)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if (args.root is None) == (args.make_jpegs is None):
        p.error("give --root DIR or --make-jpegs N")
    root = (args.root or make_jpegs(args.cache, args.make_jpegs)).resolve()
    first, last = window_for(args.workers, args.warmup_steps, args.window)
    images = len(scan_folder(root))
    if images < last * args.batch:
        raise SystemExit(f"{images} images give {images // args.batch} steps of {args.batch} in an epoch; the window "
                         f"ends at step {last}: use more images, a smaller --window or fewer --workers")
    results = []

    def record(row):
        results.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))

    for decode in args.decode.split(","):
        rows = run_app(root, args.out / f"decode-{decode}", args, decode, last)
        record({"measure": "end_to_end", "pipeline": decode, "model": args.model, "batch": args.batch,
                "img_size": args.img_size, "workers": args.workers, "device": args.device, "compile": args.compile,
                "window_steps": [first, last], "images_per_s": rate_from_metrics(rows, first, last, args.batch)})
    if args.step_only:
        record({"measure": "step_only", "model": args.model, "batch": args.batch, "img_size": args.img_size,
                "device": args.device, "compile": args.compile, "images_per_s": step_only_rate(args)})
    print(f"{'measure':>10} {'pipeline':>8} {'img/s':>9} {'of step-only':>12}")
    ceiling = next((r["images_per_s"] for r in results if r["measure"] == "step_only"), None)
    for r in results:
        share = f"{r['images_per_s'] / ceiling:.2f}" if ceiling else "-"
        print(f"{r['measure']:>10} {r.get('pipeline', '-'):>8} {r['images_per_s']:>9.1f} {share:>12}")
    return results


if __name__ == "__main__":
    main()

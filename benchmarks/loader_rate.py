"""Loader-only images/s of the pretraining input pipeline, by worker count, in steady state.

    python benchmarks/loader_rate.py --root /data/imagenet/train --workers 4,8,15 --batch 128 --decode cpu,gpu
    python benchmarks/loader_rate.py --make-jpegs 2000 --workers 0,2     # a folder of 500x375 JPEGs
    python benchmarks/loader_rate.py --make-jpegs 2000 --workers 2 --sources folder,shards

It builds exactly the loader ``fcmae-pretrain data=folder`` builds (decode, RandomResizedCrop,
flip, normalise, per-sample masks, collate), then drops the first ``workers x prefetch + 2``
batches (worker start-up and the prefetch buffer, which would otherwise inflate the rate) and
times the next ``--batches``. The JSON is rewritten after each configuration, so a run that is
cut off keeps what it measured. Pipelines (``--decode``): ``cpu`` (workers decode and augment) and
``gpu`` (workers read bytes; ``--device`` decodes and augments the batch in a background thread,
timed to the last kernel). Besides img/s it prints the main process's host CPU time per batch (all
its threads: what competes with the training step for the host), the loop thread's own share, and
the decode thread's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fcmae.data.loaders import build_pretrain_loader  # noqa: E402
from fcmae.data.shards_pack import pack  # noqa: E402

PREFETCH = 4  # build_train_loader's prefetch_factor


def make_jpegs(folder: Path, count: int, size=(500, 375), seed: int = 0) -> Path:
    """``count`` ImageNet-sized JPEGs of smooth noise (~quality 90), made once."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        path = folder / f"{i:06d}.jpg"
        if path.exists():
            continue
        small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.BICUBIC).save(path, quality=90)
    return folder


def data_config(root: Path, img_size: int, batch: int, workers: int, decode: str = "cpu",
                pin_memory: bool = False, source: str = "folder") -> SimpleNamespace:
    return SimpleNamespace(source=source, root=str(root), img_size=img_size, batch_size=batch, num_workers=workers,
                           pin_memory=pin_memory, persistent_workers=True, crop_scale=[0.2, 1.0], hflip=True,
                           mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], synthetic_images=0,
                           synthetic_classes=0, max_bad_fraction=0.01, decode=decode)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(root: Path, workers: int, batch: int, img_size: int, batches: int, decode: str = "cpu",
            device: str = "cpu", source: str = "folder") -> dict:
    device = torch.device(device)
    cfg = data_config(root, img_size, batch, workers, decode, pin_memory=device.type == "cuda", source=source)
    loader, sampler, dataset = build_pretrain_loader(cfg, 0.6, seed=0, pin_memory=device.type == "cuda",
                                                     device=device)
    warmup = workers * PREFETCH + 2
    need = warmup + batches
    if len(sampler) // batch < need:
        raise SystemExit(f"{len(dataset)} images give {len(sampler) // batch} batches of {batch}; need {need} "
                         f"(warm-up {warmup} + {batches}): use more images or --batches fewer")
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    sync(device)
    decode_before = getattr(loader, "decode_seconds", 0.0)
    start, cpu_start, loop_start = time.perf_counter(), time.process_time(), time.thread_time()
    for _ in range(batches):
        imgs = next(it)[0]
        imgs.to(device, non_blocking=True)  # the cpu pipeline's batches still have to reach the device
    sync(device)
    elapsed = time.perf_counter() - start
    # Host CPU time of the main process (every thread of it: the loop's, the decode thread, the pin
    # thread, torch's intra-op threads), the part that competes with the training step, and of the
    # loop's own thread; the workers are other processes and count in neither.
    main_ms = (time.process_time() - cpu_start) * 1e3 / batches
    loop_ms = (time.thread_time() - loop_start) * 1e3 / batches
    decode_ms = (getattr(loader, "decode_seconds", 0.0) - decode_before) * 1e3 / batches
    return {"source": source, "pipeline": decode, "device": str(device), "workers": workers, "batch": batch, "img_size": img_size,
            "batches": batches, "warmup_batches": warmup, "seconds": elapsed, "images_per_s": batches * batch / elapsed,
            "main_process_cpu_ms_per_batch": main_ms, "loop_thread_cpu_ms_per_batch": loop_ms,
            "decode_thread_cpu_ms_per_batch": decode_ms}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, help="a folder of images (searched recursively)")
    p.add_argument("--make-jpegs", type=int, metavar="N", help="make N 500x375 JPEGs in --cache and use them")
    p.add_argument("--cache", type=Path, default=Path("outputs/loader_rate_jpegs"))
    p.add_argument("--workers", default="0,2", help="comma-separated worker counts")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batches", type=int, default=10, help="timed batches per configuration, after the warm-up")
    p.add_argument("--decode", default="cpu", help="comma-separated pipelines: cpu, gpu")
    p.add_argument("--sources", default="folder",
                   help="comma-separated: folder (the files), shards (the same files packed by fcmae-shards pack "
                        "into FOLDER_shards, once)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where batches go (and where the gpu pipeline decodes)")
    p.add_argument("--json", type=Path, help="write the results here (after each configuration)")
    args = p.parse_args(argv)
    if (args.root is None) == (args.make_jpegs is None):
        p.error("give --root DIR or --make-jpegs N")
    root = args.root or make_jpegs(args.cache, args.make_jpegs)
    results = []
    print(f"{'source':>7} {'pipeline':>8} {'device':>6} {'workers':>7} {'batch':>5} {'img/s':>9} "
          f"{'main ms/b':>9} {'loop ms/b':>9} {'decode ms/b':>11}")
    for source in args.sources.split(","):
        where = root
        if source == "shards":
            where = root.with_name(f"{root.name}_shards")
            if not (where / "index.json").exists():
                pack(root, where, shard_bytes=256 << 20, kind="folder")
        for decode in args.decode.split(","):
            for workers in (int(w) for w in args.workers.split(",")):
                r = measure(where, workers, args.batch, args.img_size, args.batches, decode, args.device, source)
                results.append(r)
                print(f"{source:>7} {decode:>8} {r['device']:>6} {workers:>7} {args.batch:>5} "
                      f"{r['images_per_s']:>9.1f} {r['main_process_cpu_ms_per_batch']:>9.1f} "
                      f"{r['loop_thread_cpu_ms_per_batch']:>9.1f} {r['decode_thread_cpu_ms_per_batch']:>11.1f}",
                      flush=True)
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))
    if len(results) > 1:
        base = results[0]["images_per_s"]
        print("ratios to the first:", "  ".join(f"{r['source']}/{r['pipeline']} {r['workers']}w "
                                               f"{r['images_per_s'] / base:.2f}x" for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-band mean and std of a dataset, in the units the run reads it in (``fcmae-stats SOURCE``, and
``data.mean=auto`` at the start of a pretraining run): streamed over a seeded random sample of the
images, whole images, every pixel counted once, sums in float64.

    fcmae-stats /data/sentinel2/train --channels all --images 2000
    fcmae-stats /data/xray --channels grey          # prints: data.mean=[0.4891] data.std=[0.2473]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import torch

from ..loggers import track
from .image_io import Channels, DataError
from .sources import build_source, describe_sample
from .transforms import AsTensor

log = logging.getLogger("fcmae")


def band_stats(source, images: int = 1000, seed: int = 0, progress: str = "auto") -> tuple[list[float], list[float]]:
    """``(mean, std)`` per band over ``images`` images of ``source`` drawn without replacement (all of
    them when it has fewer), a fixed draw for ``seed``. Unreadable images (and float images with NaN or
    Inf pixels) are skipped as the loader skips them, and named and counted in a warning; items are PIL
    images (scaled to [0, 1] as the loader does) or ``[C, H, W]`` tensors. Never returns a NaN."""
    n = min(images, len(source))
    order = np.random.default_rng(seed).permutation(len(source))[:n]
    to_tensor, total, sq, count, skipped, first_error = AsTensor(), None, None, 0, 0, None
    for index in track(order.tolist(), n, "band statistics", unit="img", mode=progress):
        try:
            x = to_tensor(source[int(index)][0]).to(torch.float64)
        except Exception as exc:  # an unreadable file: the loader skips it too
            skipped += 1
            first_error = first_error or f"{describe_sample(source, int(index))}: {exc}"
            continue
        flat = x.reshape(x.shape[0], -1)
        if not torch.isfinite(flat).all():
            skipped += 1
            first_error = first_error or f"{describe_sample(source, int(index))}: NaN or Inf pixel values"
            continue
        if total is None:
            total, sq = torch.zeros(flat.shape[0], dtype=torch.float64), torch.zeros(flat.shape[0], dtype=torch.float64)
        if flat.shape[0] != total.shape[0]:
            raise DataError(f"image #{int(index)} has {flat.shape[0]} bands, the first had {total.shape[0]}")
        total += flat.sum(1)
        sq += (flat * flat).sum(1)
        count += flat.shape[1]
    if total is None:
        raise DataError(f"none of the {n} images drawn could be read, e.g. {first_error}")
    if skipped:
        log.warning("skipped %d of the %d images drawn (unreadable, the wrong band count, or NaN/Inf pixels), "
                    "as training would; the first: %s", skipped, n, first_error)
    mean = total / count
    std = (sq / count - mean * mean).clamp(min=0).sqrt()
    if not all(math.isfinite(float(v)) for v in torch.cat([mean, std])):
        raise DataError(f"the statistics of {n - skipped} images are not finite (pixel values too large for "
                        "float64 sums); check the data's units")
    return [round(float(v), 6) for v in mean], [round(max(float(v), 1e-6), 6) for v in std]


def guess_source(root: str) -> str:
    """The ``data.source`` a path is: a shard set, a file list, Fashion-MNIST, or a folder of images."""
    if root == "fashion_mnist":
        return "fashion_mnist"
    path = Path(root)
    if (path / "index.json").is_file() or "://" in root:
        return "shards"
    return "filelist" if path.is_file() else "folder"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fcmae-stats", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="a folder of images (searched recursively), a file list, a shard set, or "
                                  "'fashion_mnist' (Debian's copy)")
    p.add_argument("--channels", default="rgb", choices=("rgb", "grey", "all"), help="as data.channels")
    p.add_argument("--bands", type=lambda s: [int(b) for b in s.split(",")], help="as data.bands: e.g. 1,2,3,7")
    p.add_argument("--npy-layout", default="hwc", choices=("hwc", "chw"), help="as data.npy_layout")
    p.add_argument("--images", type=int, default=1000, help="how many images to draw (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print {'mean': [...], 'std': [...]} instead")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # progress and skipped files on stderr, in a terminal or not (stdout stays the result alone)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    kind = guess_source(args.source)
    channels = Channels(args.channels, tuple(args.bands) if args.bands else None, None, args.npy_layout)
    cfg = argparse.Namespace(source=kind, root=None if kind == "fashion_mnist" else args.source, img_size=224,
                             synthetic_images=0, synthetic_classes=0)
    try:
        source = build_source(cfg, args.seed, channels)
        mean, std = band_stats(source, args.images, args.seed)
    except DataError as exc:
        print(f"fcmae-stats: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"mean": mean, "std": std}))
    else:
        print(f"data.mean=[{','.join(map(str, mean))}] data.std=[{','.join(map(str, std))}]"
              f"{'' if len(mean) == 3 and args.channels == 'rgb' else f' model.in_chans={len(mean)}'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

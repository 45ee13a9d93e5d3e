#!/usr/bin/env python
"""k-NN and linear-probe top-1 on Fashion-MNIST for three kinds of features, on the same
images as the pretraining monitor (100 train images per class, 200 test images per class):
raw pixels (28x28 grey), a random-init atto encoder, and a pretrained export.

    python benchmarks/fmnist_probe.py --export outputs/fmnist_transfer/atto_fmnist_timm.safetensors \\
        --out outputs/fmnist_transfer/probe.json
"""
import argparse
import json

import numpy as np
import torch
from torch.utils.data import DataLoader

from fcmae import create_fcmae
from fcmae.data.samples import EvalImages
from fcmae.data.transforms import eval_transform
from fcmae.data.sources import labelled_source
from fcmae.evaluation import extract_features, knn_accuracy, linear_probe_accuracy
from fcmae.pretrain import load_encoder_init


def scores(tf, ty, vf, vy) -> dict:
    return {**knn_accuracy(tf, ty, vf, vy, 10), **linear_probe_accuracy(tf, ty, vf, vy, 10)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", required=True, help="pretrained encoder (any layout fcmae-export reads)")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--val-per-class", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0, help="which images (the monitor uses trainer.seed, 0)")
    ap.add_argument("--out", default=None, help="write the scores here as JSON")
    ap.add_argument("--spatial", action="store_true",
                    help="also score the unpooled last-stage map (C x h x w), flattened")
    args = ap.parse_args()

    sets = [labelled_source("fashion_mnist", None, split, 0, 10, args.size, args.seed, n, args.seed)
            for split, n in (("train", args.train_per_class), ("val", args.val_per_class))]
    out = {}
    raw = [(torch.tensor(np.stack([np.asarray(s[i][0].convert("L"), dtype=np.float32).ravel() / 255
                                   for i in range(len(s))])), torch.as_tensor(s.labels)) for s in sets]
    out["raw_pixels"] = scores(*raw[0], *raw[1])

    loaders = [DataLoader(EvalImages(s, eval_transform(args.size), args.size), batch_size=128) for s in sets]
    for name in ("random_init", "pretrained"):
        torch.manual_seed(args.seed)
        model = create_fcmae("convnextv2_atto")
        if name == "pretrained":
            load_encoder_init(model, args.export)
        feats = [extract_features(model.encoder, loader, torch.device("cpu")) for loader in loaders]
        out[name] = scores(*feats[0], *feats[1])
        if args.spatial:
            feats = [extract_features(model.encoder, loader, torch.device("cpu"), pool=False) for loader in loaders]
            out[f"{name}_spatial"] = scores(*feats[0], *feats[1])
    for name, s in out.items():
        print(f"{name:18s} k-NN top-1 {s['knn_top1']:5.1f}   linear top-1 {s['linear_top1']:5.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

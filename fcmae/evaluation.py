"""Representation quality while pretraining runs: k-NN and linear-probe accuracy of
pooled encoder features (nothing masked) on a labelled train/val pair.

Features come from the encoder's plain dense forward (what fine-tuning will see),
global-average pooled. Every rank extracts its shard; rank 0 scores.
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F

from .data import (EvalImages, build_eval_loader, channels_of, class_names_of, eval_transform, labelled_source,
                   num_classes_of)
from .distributed import DistInfo, all_gather_objects
from .loggers import track

log = logging.getLogger("fcmae")


@contextlib.contextmanager
def inference(model: torch.nn.Module, device: torch.device):
    """Eval mode, no grad, bf16 autocast on CUDA; the model's train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            yield
    finally:
        model.train(was_training)


def extract_features(encoder, loader, device: torch.device, pool: bool = True, what: str = "features",
                     progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features float32 on CPU, labels (M,))`` for the readable images of ``loader``:
    ``(M, C)`` globally pooled, or with ``pool=False`` the whole last-stage map flattened, ``(M, C*h*w)``.
    A long extraction shows its progress (``loggers.track``) on the process that has ``progress``."""
    feats, labels = [], []
    with inference(encoder, device):
        for imgs, y, ok in track(loader, _len(loader), what, enabled=progress):
            f = encoder.forward_unmasked(imgs.to(device, non_blocking=True))
            f = f.mean(dim=(2, 3)) if pool else f.flatten(1)
            feats.append(f.float().cpu()[ok])
            labels.append(y[ok])
    return torch.cat(feats), torch.cat(labels)


def _len(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def knn_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> dict:
    """Weighted k-NN on cosine similarity: each of the ``k`` nearest training features
    votes for its class with weight ``exp(sim / temperature)``. Returns top-1 (and top-5) in %."""
    train_f, val_f = F.normalize(train_f, dim=1), F.normalize(val_f, dim=1)
    k = min(k, train_f.shape[0])
    top1 = top5 = 0
    for start in range(0, val_f.shape[0], chunk):
        sim = val_f[start:start + chunk] @ train_f.T
        s, idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, train_y[idx], (s / temperature).exp())
        y = val_y[start:start + chunk]
        ranked = votes.argsort(dim=1, descending=True)
        top1 += (ranked[:, 0] == y).sum().item()
        top5 += (ranked[:, :5] == y[:, None]).any(dim=1).sum().item()
    n = val_f.shape[0]
    out = {"knn_top1": 100.0 * top1 / n}
    if num_classes > 5:
        out["knn_top5"] = 100.0 * top5 / n
    return out


def linear_probe_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, val_f: torch.Tensor, val_y: torch.Tensor,
                          num_classes: int, steps: int = 300, lr: float = 1e-2, weight_decay: float = 1e-4,
                          seed: int = 0) -> dict:
    """A linear classifier on standardised features, full-batch AdamW; val top-1 in %."""
    mean, std = train_f.mean(0), train_f.std(0).clamp(min=1e-6)
    xt, xv = (train_f - mean) / std, (val_f - mean) / std
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(xt.shape[1], num_classes)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=g)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(head(xt), train_y).backward()
            opt.step()
    with torch.no_grad():
        pred = head(xv).argmax(dim=1)
    return {"linear_top1": 100.0 * (pred == val_y).float().mean().item()}


class FeatureEvaluator:
    """Scores an encoder every ``every_epochs`` epochs (and at the run's end)."""

    def __init__(self, eval_cfg, train_loader, val_loader, num_classes: int, device: torch.device, seed: int):
        self.cfg = eval_cfg
        self.train_loader, self.val_loader = train_loader, val_loader
        self.num_classes, self.device, self.seed = num_classes, device, seed

    def due(self, epoch: int, final: bool) -> bool:
        return final or epoch % self.cfg.every_epochs == 0

    def __call__(self, encoder, info: DistInfo) -> dict | None:
        parts = [extract_features(encoder, loader, self.device, what=f"eval {name} features", progress=info.is_main)
                 for name, loader in (("train", self.train_loader), ("val", self.val_loader))]
        gathered = all_gather_objects(parts, info)
        if not info.is_main:
            return None
        (tf, ty), (vf, vy) = [(torch.cat([g[i][0] for g in gathered]), torch.cat([g[i][1] for g in gathered]))
                              for i in range(2)]
        out = {}
        if "knn" in self.cfg.name:
            out.update(knn_accuracy(tf, ty, vf, vy, self.num_classes, self.cfg.k, self.cfg.temperature))
        if "linear" in self.cfg.name:
            out.update(linear_probe_accuracy(tf, ty, vf, vy, self.num_classes, self.cfg.linear_steps,
                                             self.cfg.linear_lr, self.cfg.linear_weight_decay, self.seed))
        return {f"eval/{k}": v for k, v in out.items()}


def build_evaluator(eval_cfg, data_cfg, seed: int, info: DistInfo, in_chans: int = 3) -> FeatureEvaluator | None:
    """None for ``eval=none``; otherwise the labelled sets are scanned now, so a bad
    folder fails before training starts."""
    if eval_cfg.name == "none":
        return None
    size = eval_cfg.img_size or data_cfg.img_size
    transform = eval_transform(size, eval_cfg.crop_pct, data_cfg.mean, data_cfg.std)
    e, channels = eval_cfg, channels_of(data_cfg, in_chans)  # the sets are read as the pretraining data
    train = labelled_source(e.source, e.train_root, "train", e.synthetic_train_images, data_cfg.synthetic_classes,
                            size, seed, e.labels_per_class, seed, channels=channels)
    val = labelled_source(e.source, e.val_root, "val", e.synthetic_val_images, data_cfg.synthetic_classes, size,
                          seed, e.val_per_class, seed, class_names=class_names_of(train),  # labels by class name
                          channels=channels)
    train_loader, val_loader = [build_eval_loader(EvalImages(src, transform, size, in_chans), eval_cfg.batch_size,
                                                  eval_cfg.num_workers, info.rank, info.world_size)
                                for src in (train, val)]
    return FeatureEvaluator(eval_cfg, train_loader, val_loader, num_classes_of(train), info.device, seed)

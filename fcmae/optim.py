"""Optimizers as the official ConvNeXt V2 code builds them: AdamW with the pretraining
weight-decay split, the fine-tuning layer-wise lr decay (``single`` | ``group``), and the
per-step warmup + cosine schedule both use."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def no_weight_decay(name: str, param: torch.Tensor, decay_grn_and_mask_token: bool = True) -> bool:
    """The official pretraining rule (timm 0.3.2 ``add_weight_decay``): 1-D parameters and
    biases are not decayed; GRN gamma/beta (``(1, 1, 1, C)``) and the mask token are.
    With ``decay_grn_and_mask_token=False`` those are skipped too."""
    if param.ndim <= 1 or name.endswith(".bias"):
        return True
    return not decay_grn_and_mask_token and (".grn." in name or name.endswith("mask_token"))


def param_groups(model: nn.Module, weight_decay: float, decay_grn_and_mask_token: bool = True) -> list[dict]:
    decay, skip = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (skip if no_weight_decay(name, p, decay_grn_and_mask_token) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": skip, "weight_decay": 0.0}]


def adamw(groups: list[dict], lr: float, betas, cuda: bool) -> torch.optim.Optimizer:
    """AdamW over parameter groups (fused kernels on CUDA)."""
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=cuda or None)


# ---------------------------------------------------------------- fine-tuning: layer-wise lr decay

LAYER_DECAY_TYPES = ("single", "group")


def convnext_layer_id(name: str, depths, decay_type: str) -> int:
    """The official ``optim_factory.py`` layer id of a timm ``convnextv2`` parameter.

    ``single`` (atto-tiny): stem and each downsample share the level of the first block of
    their stage; block ``j`` of stage ``i`` is ``sum(depths[:i]) + j + 1``; head ``sum(depths) + 1``.
    ``group`` (base and larger): 12 + 2 levels, stage 2 split into groups of 3 blocks.
    """
    parts = name.split(".")
    if parts[0] == "stem":
        stage, block = 0, None
    elif parts[0] == "stages" and parts[2] == "downsample":
        stage, block = int(parts[1]), None
    elif parts[0] == "stages" and parts[2] == "blocks":
        stage, block = int(parts[1]), int(parts[3])
    else:  # head.norm, head.fc
        return num_decay_layers(depths, decay_type) + 1
    if decay_type == "single":
        return sum(depths[:stage]) + (block or 0) + 1
    if block is None:
        return (0, 2, 3, 12)[stage]
    return 3 + block // 3 if stage == 2 else (1, 2, None, 12)[stage]


def num_decay_layers(depths, decay_type: str) -> int:
    return 12 if decay_type == "group" else sum(depths)


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float, decay_type: str,
                       depths) -> list[dict]:
    """Parameter groups of the official fine-tuning: layer ``i`` of ``L`` trains at
    ``layer_decay ** (L + 1 - i)`` times the lr (``lr_scale``); 1-D parameters and biases
    (norms, GRN, ...) are not decayed."""
    if decay_type not in LAYER_DECAY_TYPES:
        raise ValueError(f"layer decay type {decay_type!r}; use single or group")
    top = num_decay_layers(depths, decay_type) + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = convnext_layer_id(name, depths, decay_type) if layer_decay != 1.0 else top
        decay = not (p.ndim <= 1 or name.endswith(".bias"))
        group = groups.setdefault((layer, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                   "lr_scale": layer_decay ** (top - layer)})
        group["params"].append(p)
    return list(groups.values())


def cosine_lr(step: int, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from 0 over ``warmup_steps``, then cosine from ``base_lr`` to ``min_lr``."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr, times its ``lr_scale`` (layer-wise decay) when it has one."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)

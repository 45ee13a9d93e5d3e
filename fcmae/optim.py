"""AdamW with the MAE/FCMAE weight-decay split, and the per-step warmup + cosine schedule."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norm weights, GRN gamma/beta and the mask token are not decayed."""
    return param.ndim <= 1 or name.endswith(".bias") or ".grn." in name or name.endswith("mask_token")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, skip = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (skip if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": skip, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optim_cfg, lr: float) -> torch.optim.Optimizer:
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(param_groups(model, optim_cfg.weight_decay), lr=lr,
                             betas=tuple(optim_cfg.betas), fused=fused or None)


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

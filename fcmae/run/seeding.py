"""Random streams: the same on every rank where the ranks must agree (model initialisation before
DDP), one per rank where they differ (drop path, mixup); a resume restores them exactly."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_rank(seed: int, rank: int) -> None:
    """Per-rank streams for what differs between ranks (drop path; timm's Mixup draws from NumPy
    and Python), as the official code seeds with seed + rank; a resume restores them exactly."""
    torch.manual_seed(seed + rank)
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)


def seed_everything(seed: int) -> None:
    """The same streams on every rank (model initialisation must agree before DDP)."""
    seed_rank(seed, 0)



"""The contract between the loop and an app: a :class:`Task` says what a batch means (a loss) and
what happens after a step and at an epoch's end; :class:`RunParts` is what an app builds for the
loop, in one place."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..storage.checkpoint_store import CheckpointManager
from ..distributed import DistInfo


class Task:
    """What the loop trains. Batches are tuples whose first item is the images
    and whose third is the count of unreadable files skipped to fill it."""

    def loss(self, model: nn.Module, batch: tuple, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, loop) -> None:
        """Called on every rank after each optimizer step."""

    def evaluate(self, loop, final: bool) -> dict | None:
        """Called on every rank at each epoch's end (and at the run's end with
        ``final=True``); returns metrics to log, or None."""
        return None

    def state_dict(self) -> dict:
        """Task state saved at the top level of every checkpoint (e.g. EMA weights, best scores)."""
        return {}

    def load_state_dict(self, checkpoint: dict) -> None:
        """Restore from a whole checkpoint (the keys :meth:`state_dict` wrote)."""


@dataclass
class RunParts:
    """What an app builds for the loop, in one place (``runner.train`` runs it)."""
    model: nn.Module  # what the loop calls: DDP- and/or compile-wrapped
    raw_model: nn.Module  # the bare module: checkpoints, EMA, evaluation
    optimizer: torch.optim.Optimizer
    scaler: object | None  # GradScaler under fp16
    loader: object
    sampler: object  # a ResumableSampler
    dist: DistInfo
    ckpt: CheckpointManager
    tracker: object  # wandb or a null logger
    config: dict  # the resolved config, saved in every checkpoint
    run_dir: Path

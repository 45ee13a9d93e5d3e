"""The contract between the loop and an app: a :class:`Task` says what a batch means (a loss) and
what happens after a step and at an epoch's end, seeing the run through a :class:`TaskContext`;
:class:`RunParts` is what an app builds for the loop, in one place."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..storage.checkpoint_store import CheckpointManager
from ..distributed import DistInfo
from .state import LoopSettings, LoopState


@dataclass(frozen=True)
class TaskContext:
    """What a task's hooks (and the loop's callbacks) may use of the run: where it is, how it runs, and two
    actions. ``state`` is the loop's own (it moves on as the run does); the rest does not change."""
    state: LoopState  # step, epoch, ...: read, never written
    settings: LoopSettings  # stop step, precision, ...
    dist: DistInfo
    raw_model: nn.Module  # the bare module (no DDP or compile wrapper): evaluation, EMA, pictures
    optimizer: torch.optim.Optimizer
    run_dir: Path
    tracker: object  # wandb / TensorBoard / a null logger: log_image, log
    save: Callable[[str | None], Path | None]  # a checkpoint now (every rank calls it): numbered, or by name
    write_output: Callable[[Callable[[], object]], None]  # a file write whose failure stops every rank cleanly


class Task:
    """What the loop trains. Batches are tuples whose first item is the images
    and whose third is the count of unreadable files skipped to fill it."""

    def loss(self, model: nn.Module, batch: tuple, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, run: TaskContext) -> None:
        """Called on every rank after each optimizer step."""

    def evaluate(self, run: TaskContext, final: bool) -> dict | None:
        """Called on every rank at each epoch's end (and at the run's end with
        ``final=True``); returns metrics to log, or None."""
        return None

    def state_dict(self) -> dict:
        """Task state saved at the top level of every checkpoint (e.g. EMA weights, best scores)."""
        return {}

    def load_state_dict(self, entries: dict) -> None:
        """Restore from the entries :meth:`state_dict` wrote (the checkpoint record's ``task``)."""


@dataclass
class RunParts:
    """What an app builds for the loop, in one place (:func:`fcmae.run.assembly.train` runs it)."""
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

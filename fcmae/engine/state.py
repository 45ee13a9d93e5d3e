"""Where a run is (:class:`LoopState`, all a resume needs), how the loop runs
(:class:`LoopSettings`), and the blow-up rule that :class:`NonFiniteLoss` reports.

Position is counted in optimizer steps (``step``) and, inside an epoch, in micro-batches already
consumed (``batch_in_epoch``, always a multiple of the accumulation at a checkpoint).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Callable

from ..errors import UserError

# A step's loss past this many times the lowest loss of the run (and at least this far above it) is
# taken as the start of a blow-up: checkpoints whose weights fed such a step are not "good".
BLOWUP_FACTOR = 10.0


class NonFiniteLoss(UserError, RuntimeError):
    """The loss, gradient or weights stopped being finite at ``step``; ``blowup_step`` is the first
    step whose loss had already left its sane range (the weights that fed it were bad)."""

    def __init__(self, message: str, step: int = 0, blowup_step: int | None = None):
        super().__init__(message)
        self.step, self.blowup_step = step, blowup_step


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    bad_images: int = 0  # over all ranks
    seen_images: int = 0  # over all ranks
    finished: bool = False  # the final evaluation and checkpoint of stop_step are done
    loss_floor: float | None = None  # the lowest step loss so far (this rank's), for the blow-up bound
    blowup_step: int | None = None  # the first step whose loss passed the bound (None: none yet)

    # what a checkpoint written before a field existed means by its absence
    _OLD_FILE_DEFAULTS = {"finished": True}

    def to_dict(self) -> dict:
        """The fields as a checkpoint stores them (flat, beside the weights)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "LoopState":
        """The position a checkpoint stores; a field it lacks (an older file) takes its old meaning."""
        return cls(**{f.name: d.get(f.name, cls._OLD_FILE_DEFAULTS.get(f.name, f.default)) for f in fields(cls)})

    def watch_loss(self, step: int, loss: float) -> None:
        """Track the lowest loss and the first step whose loss blew past ``BLOWUP_FACTOR`` times it."""
        if self.blowup_step is None and (not math.isfinite(loss) or (
                self.loss_floor is not None and loss > max(BLOWUP_FACTOR * self.loss_floor,
                                                           self.loss_floor + BLOWUP_FACTOR))):
            self.blowup_step = step
        if math.isfinite(loss) and (self.loss_floor is None or loss < self.loss_floor):
            self.loss_floor = loss


@dataclass
class LoopSettings:
    total_steps: int  # schedule length: epochs * steps_per_epoch, or max_steps when larger
    stop_step: int  # max_steps if given, else total_steps
    steps_per_epoch: int
    accum: int
    base_lr: float
    min_lr: float
    warmup_steps: int
    batch_size: int
    precision: str  # fp32 | bf16 | fp16
    clip_grad: float | None
    log_every: int
    ckpt_every: int
    max_bad_fraction: float
    progress: str = "auto"
    callbacks: list[Callable] = field(default_factory=list)
    stretched: bool = False  # trainer.max_steps lies beyond trainer.epochs: the cosine ends at max_steps

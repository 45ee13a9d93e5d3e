"""Where a run is (:class:`LoopState`, all a resume needs), how the loop runs
(:class:`LoopSettings`), and the divergence rules: a loss that leaves its range marks a spike (a
warning; the checkpoints its weights fed are not "good"), a spike the loss comes back from is
recorded and forgiven, and one past ``trainer.divergence_stop`` stops the run (:class:`LossDiverged`)
as a non-finite loss does (:class:`NonFiniteLoss`).

Position is counted in optimizer steps (``step``) and, inside an epoch, in micro-batches already
consumed (``batch_in_epoch``, always a multiple of the accumulation at a checkpoint).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from ..errors import UserError
from ..storage.checkpoint_record import RunPosition

# A step's loss past this many times the lowest loss of the run (and at least this far above it) is
# taken as the start of a blow-up: checkpoints whose weights fed such a step are not "good".
BLOWUP_FACTOR = 10.0
# This many steps in a row back within the range end a spike: the run recovered, and checkpoints
# taken from then on are good again.
RECOVERY_STEPS = 10


class NonFiniteLoss(UserError, RuntimeError):
    """The loss, gradient or weights stopped being finite at ``step``; ``blowup_step`` is the first
    step whose loss had already left its sane range (the weights that fed it were bad)."""

    def __init__(self, message: str, step: int = 0, blowup_step: int | None = None):
        super().__init__(message)
        self.step, self.blowup_step = step, blowup_step


class LossDiverged(NonFiniteLoss):
    """The loss stayed finite but passed ``trainer.divergence_stop`` times its lowest: the run stops
    as for a non-finite loss (the same checkpoints set aside, the same advice)."""


def check_divergence_stop(value: float | None, check) -> None:
    """``trainer.divergence_stop``: null, or a factor above the range a loss is warned of leaving."""
    check(value is None or value > BLOWUP_FACTOR,
          f"trainer.divergence_stop={value} must be above {BLOWUP_FACTOR:g} (a loss past {BLOWUP_FACTOR:g} times "
          "its lowest is already warned of), or null to never stop a run whose loss stays finite")


class LoopState(RunPosition):
    """Where a run is (the fields, as every checkpoint records them: :class:`RunPosition`), with the
    rules of the loss's range the loop applies to it."""

    def past(self, loss: float, factor: float) -> bool:
        """Whether a finite ``loss`` lies past ``factor`` times the lowest loss so far and at least ``factor``
        above it (the second keeps a floor near 0 from calling noise a blow-up)."""
        floor = self.loss_floor
        return floor is not None and loss > max(factor * floor, floor + factor)

    def out_of_range(self, loss: float) -> bool:
        """Whether ``loss`` is not finite or past ``BLOWUP_FACTOR`` (:meth:`past`)."""
        return not math.isfinite(loss) or self.past(loss, BLOWUP_FACTOR)

    def watch_loss(self, step: int, loss: float) -> str | None:
        """Track the lowest loss and spikes: returns ``"left"`` at the step the loss leaves its range
        (the spike's first step), ``"recovered"`` at the step that ends it (``RECOVERY_STEPS`` in a row
        back in range: it goes to ``spikes``, and ``blowup_step`` is cleared), else None."""
        event = None
        if self.out_of_range(loss):
            if self.blowup_step is None:
                self.blowup_step, self.blowup_peak, event = step, loss, "left"
            elif math.isfinite(loss):
                self.blowup_peak = max(self.blowup_peak or loss, loss)
            self.calm_steps = 0
        elif self.blowup_step is not None:
            self.calm_steps += 1
            if self.calm_steps >= RECOVERY_STEPS:
                self.spikes.append([self.blowup_step, step, self.blowup_peak])
                self.blowup_step, self.blowup_peak, self.calm_steps, event = None, None, 0, "recovered"
        if math.isfinite(loss) and (self.loss_floor is None or loss < self.loss_floor):
            self.loss_floor = loss
        return event


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
    divergence_stop: float | None = 1000.0  # stop when a loss passes this many times the lowest (None: never)
    read_timeout: float | None = None  # seconds one batch may take to arrive before it is a hung read (None: no bound)

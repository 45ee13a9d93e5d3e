"""What every rank must agree on after a step: the unreadable files of all ranks (so the count,
the limit and the stop are global), whether any rank caught a stop signal, and whether rank 0
failed to write (a refused write stops every rank together, none left waiting in a collective).
Under DDP that is one small all-reduce per step, which the loop reads a step later (no host wait)."""
from __future__ import annotations

import signal
from typing import Callable

import torch

from ..distributed import DistInfo, all_reduce_sum, host_to_device
from ..storage.files import DiskWriteError
from .signals import PreemptionGuard
from .state import LoopState, NonFiniteLoss
from ..errors import UserError


class DataQualityError(UserError, RuntimeError):
    pass


class StepSync:
    """The step's agreement between ranks, and rank 0's pending write failure.

    ``guard`` is the loop's :class:`PreemptionGuard` while it trains (None before: nothing to stop);
    ``stop_signal`` is the signal every rank has agreed to stop on (None: keep training)."""

    def __init__(self, dist: DistInfo, max_bad_fraction: float):
        self.dist, self.max_bad_fraction = dist, max_bad_fraction
        self.guard: PreemptionGuard | None = None
        self.stop_signal: int | None = None
        self.bad_local = 0  # this rank's unreadable files since the last step's all-reduce
        self.write_failure: DiskWriteError | None = None  # rank 0's, until the next collective
        self.divergence: NonFiniteLoss | None = None  # this rank's loss passed the divergence bound

    def start(self, guard: PreemptionGuard) -> None:
        self.guard, self.stop_signal, self.bad_local = guard, None, 0

    @property
    def signalled(self) -> bool:
        """Whether this rank caught a stop signal (not yet agreed on)."""
        return self.guard is not None and self.guard.signum is not None

    def diverged(self, exc: NonFiniteLoss) -> None:
        """This rank's loss passed the divergence bound: raise at once in one process; under DDP at the
        ranks' next agreement (every rank raises there, none left waiting in a collective)."""
        if not self.dist.enabled:
            raise exc
        self.divergence = self.divergence or exc

    def agree_to_stop(self, stop: bool) -> None:
        """Record a stop every rank saw in a collective (the signal this rank caught, else SIGTERM)."""
        if stop and self.guard is not None and self.stop_signal is None:
            self.stop_signal = self.guard.signum or signal.SIGTERM

    def write_output(self, write: Callable[[], object]) -> None:
        """Run one of rank 0's writes (an image, a log line). A refusal by the disk stops the run: at
        once in one process; under DDP at the next collective (a step's sync or a save), so that
        every rank stops together."""
        try:
            write()
        except DiskWriteError as exc:
            if not self.dist.enabled:
                raise
            self.write_failure = self.write_failure or exc

    @staticmethod
    def raise_write_failure(failure: DiskWriteError | None) -> None:
        """Rank 0 raises its own error; the others one that points to it."""
        raise failure or DiskWriteError("rank 0 could not write to the run directory (its log says why); every "
                                        "rank stops here")

    def after_step(self, state: LoopState) -> None:
        """The step's agreement, read now (under DDP an all-reduce the host waits for): bad files
        into ``state.bad_images``, a stop agreed on, a write failure raised on every rank."""
        flags = self.reduced_flags()
        self.apply(state, *(flags.tolist() if flags is not None else self.take_local()))

    def take_local(self) -> tuple[int, bool, bool, bool]:
        """This rank's flags since the last call: unreadable files, a caught signal, a write failure, a
        diverged loss."""
        flags = self.bad_local, self.signalled, self.write_failure is not None, self.divergence is not None
        self.bad_local = 0
        return flags

    def reduced_flags(self) -> torch.Tensor | None:
        """Under DDP, the ranks' flags summed (on the device, not read: the loop reads them a step
        later, :class:`StepReadback`); None in one process, where :meth:`take_local` is all there is."""
        if not self.dist.enabled:
            return None
        flags = host_to_device(torch.tensor([float(f) for f in self.take_local()]), self.dist.device)
        return all_reduce_sum(flags, self.dist)

    def apply(self, state: LoopState, bad: float, stop: float, failed: float, diverged: float = 0.0) -> None:
        """Act on (agreed) flags: every rank holds the same values, so every rank acts alike."""
        if failed:
            self.raise_write_failure(self.write_failure)
        if diverged:
            raise self.divergence or NonFiniteLoss(
                "the loss diverged on another rank (its log says where); every rank stops here", state.step,
                state.blowup_step if state.blowup_step is not None else state.step)
        state.bad_images += int(bad)
        self.agree_to_stop(bool(stop))

    def check_data_quality(self, state: LoopState) -> None:
        """Every rank holds the same global counts here, so every rank decides alike."""
        if state.bad_images and state.bad_images > self.max_bad_fraction * max(state.seen_images, 100):
            raise DataQualityError(
                f"{state.bad_images} of {state.seen_images} images were unreadable (more than "
                f"data.max_bad_fraction={self.max_bad_fraction}); fix the data or raise the limit"
            )

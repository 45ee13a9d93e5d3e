"""Stop signals: a signal ends a run cleanly, with a checkpoint at the next step boundary, then
:class:`Preempted` (exit 128 + signal). :class:`PreemptionGuard` turns the signals into a flag."""
from __future__ import annotations

import logging
import signal
from pathlib import Path

log = logging.getLogger("fcmae")

# Signals that end a run cleanly: a checkpoint at the next step boundary, then exit 128 + signal.
# SIGTERM: Slurm's time limit, scancel, preemption, `timeout`, most process managers;
# SIGUSR1/SIGUSR2: Slurm's --signal warning; SIGINT: Ctrl-C. A SIGINT or SIGTERM after any of them
# exits at once (no checkpoint: the last one stands).
PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")
ESCALATING = ("SIGINT", "SIGTERM")


class Preempted(RuntimeError):
    def __init__(self, signum: int, step: int, path: Path | None):
        where = f"checkpoint {path}" if path is not None else "nothing new to checkpoint"
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; {where}")
        self.signum, self.step, self.path = signum, step, path


class PreemptionGuard:
    """Turns SIGTERM/SIGUSR1/SIGUSR2/SIGINT into a flag the loop checks after each optimizer
    step, so the checkpoint is written at a clean step boundary; while the loop waits for a batch
    (:mod:`fcmae.engine.read_watch`) the signal also bounds the wait. A SIGINT or
    SIGTERM after a first signal (whichever it was) raises KeyboardInterrupt at once (a write in
    progress removes its temporary file). Handlers that were installed before (e.g. submitit's
    requeue on SIGUSR2) are called after the checkpoint.

    Guards nest: the apps hold one from their start (:func:`fcmae.run.entry.hydra_entry`), so a signal that
    arrives while data and model are still being set up (a Slurm warning due early) is not lost:
    the loop's own guard inherits it and stops after the first step, with a checkpoint."""

    _active: "PreemptionGuard | None" = None

    def __init__(self):
        self.signum: int | None = None
        self.on_signal_while_reading = None  # set during a fetch (read_watch): a stop signal bounds the wait
        self.previous: dict[int, object] = {}  # what to restore on exit
        self.launcher: dict[int, object] = {}  # the handlers from before any guard: chained to

    @classmethod
    def current(cls) -> "PreemptionGuard | None":
        """The innermost guard in force (None outside every guard): what a read watched before the loop
        starts (:mod:`fcmae.engine.read_watch`) reports a stop signal to."""
        return cls._active

    def __enter__(self):
        self._outer = PreemptionGuard._active
        for name in PREEMPT_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                try:
                    self.previous[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread
                    pass
        self.launcher = self._outer.launcher if self._outer is not None else dict(self.previous)
        if self._outer is not None:
            self.signum = self._outer.signum
        PreemptionGuard._active = self
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signal.Signals(signum).name in ESCALATING:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
            if signum == signal.SIGINT:
                log.warning("caught SIGINT: stopping after this step's checkpoint (Ctrl-C again to exit at once)")
        if self.on_signal_while_reading is not None:
            self.on_signal_while_reading()

    def chain(self) -> None:
        """Call the launcher's handler for the signal (from before any guard), if it was a real one."""
        prev = self.launcher.get(self.signum)
        if callable(prev) and prev is not signal.default_int_handler:
            prev(self.signum, None)

    def __exit__(self, *exc):
        for sig, prev in self.previous.items():
            signal.signal(sig, prev)
        PreemptionGuard._active = self._outer
        if self._outer is not None and self._outer.signum is None:
            self._outer.signum = self.signum  # seen, whether acted on or not
        return False

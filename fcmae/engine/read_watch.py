"""Reads that cannot block a stop. Around each fetch of a batch (:class:`ReadWatch`):

- a stop signal interrupts a fetch still waiting ``STOP_GRACE_S`` after it (one process: the loop
  drops the half-accumulated step and stops with a checkpoint of the last whole one; under DDP the
  other ranks may be inside a collective, so there the signal waits for the step boundary, and the
  bound below ends a hang);
- a fetch that takes longer than ``data.read_timeout`` seconds is a hung read (a dead network mount,
  a FIFO, a file that never ends): :class:`HungRead`, naming what was being read, after a checkpoint
  of the last whole step (one process).

Both interrupt from a signal handler, so they reach a read blocked in a system call (PEP 475: a
handler that raises ends the call). They derive from BaseException until the loop catches them:
the data code's ``except Exception`` (an unreadable file is skipped) must not swallow them.
"""
from __future__ import annotations

import contextlib
import signal
import time

from ..errors import UserError


STOP_GRACE_S = 5.0  # a fetch still waiting this long after a stop signal is interrupted


class ReadInterrupted(BaseException):
    """A stop signal arrived while the loop waited for a batch."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class ReadTimedOut(BaseException):
    """No batch within the read timeout."""


class HungRead(UserError, RuntimeError):
    """A batch took longer than ``data.read_timeout``: a read hangs."""


class ReadWatch:
    """``with watch.fetch(): batch = next(iterator)``. ``guard`` is the loop's PreemptionGuard (None: no
    signals to honour); ``timeout`` in seconds (None or 0: no bound); ``interruptible``: whether a stop
    signal may interrupt a fetch (one process). A signal interrupts a fetch only if it is still waiting
    ``STOP_GRACE_S`` after the signal: a batch on its way is received whole (interrupting a transfer
    from a worker half-way leaves the worker's side of it with a broken connection), a hung read is not
    waited on."""

    def __init__(self, guard, timeout: float | None, interruptible: bool):
        self.guard, self.timeout, self.interruptible = guard, timeout or None, interruptible
        self._deadline: float | None = None  # when the fetch counts as hung
        self._stop_at: float | None = None  # when a stop signal interrupts it

    @contextlib.contextmanager
    def fetch(self):
        interruptible = self.interruptible and self.guard is not None
        previous, outer, started = None, 0.0, time.monotonic()
        self._deadline = started + self.timeout if self.timeout else None
        self._stop_at = started + STOP_GRACE_S if interruptible and self.guard.signum is not None else None
        if self._deadline is not None or interruptible:
            try:
                previous = signal.signal(signal.SIGALRM, self._alarm)
                outer = signal.setitimer(signal.ITIMER_REAL, 0)[0]  # a timer already set (pytest-timeout's)
            except ValueError:  # not the main thread: neither bound nor interruption
                previous, interruptible, self._deadline, self._stop_at = None, False, None, None
        if interruptible:
            self.guard.on_signal_while_reading = self._stop_requested
        self._arm()
        try:
            yield
        finally:
            if interruptible:
                self.guard.on_signal_while_reading = None
            self._deadline = self._stop_at = None
            if previous is not None:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
                if outer:  # give the outer timer back what is left of it
                    signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 1e-3))

    def _arm(self) -> None:
        due = [t for t in (self._deadline, self._stop_at) if t is not None]
        if due:
            signal.setitimer(signal.ITIMER_REAL, max(min(due) - time.monotonic(), 1e-3))

    def _stop_requested(self) -> None:
        """Called by the guard when a stop signal arrives during the fetch."""
        if self._stop_at is None:
            self._stop_at = time.monotonic() + STOP_GRACE_S
            self._arm()

    def _alarm(self, signum, frame):
        now = time.monotonic()
        if self._stop_at is not None and now >= self._stop_at:
            raise ReadInterrupted(self.guard.signum)
        if self._deadline is not None and now >= self._deadline:
            raise ReadTimedOut()
        self._arm()

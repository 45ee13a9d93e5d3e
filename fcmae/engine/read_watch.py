"""Reads that cannot block a stop. Around each fetch of a batch (:class:`ReadWatch`):

- a stop signal interrupts the fetch at once (one process: the loop drops the half-accumulated step
  and stops with a checkpoint of the last whole one; under DDP the other ranks may be inside a
  collective, so there the signal waits for the step boundary, and the bound below ends a hang);
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
    """``with watch.fetch(): batch = next(iterator)``. ``guard`` is the loop's PreemptionGuard (it raises
    :class:`ReadInterrupted` while ``guard.reading``); ``timeout`` in seconds (None or 0: no bound);
    ``interruptible``: whether a signal may interrupt a fetch (one process)."""

    def __init__(self, guard, timeout: float | None, interruptible: bool):
        self.guard, self.timeout, self.interruptible = guard, timeout or None, interruptible

    @contextlib.contextmanager
    def fetch(self):
        previous, outer, started = None, 0.0, time.monotonic()
        if self.timeout:
            try:
                previous = signal.signal(signal.SIGALRM, self._alarm)
                outer = signal.setitimer(signal.ITIMER_REAL, self.timeout)[0]  # a timer already set (pytest-timeout's)
            except ValueError:  # not the main thread: no bound
                previous = None
        if self.guard is not None:
            self.guard.reading = self.interruptible
        try:
            yield
        finally:
            if self.guard is not None:
                self.guard.reading = False
            if previous is not None:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
                if outer:  # give the outer timer back what is left of it
                    signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - started), 1e-3))

    @staticmethod
    def _alarm(signum, frame):
        raise ReadTimedOut()

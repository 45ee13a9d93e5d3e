"""A step's scalars (its loss, gradient norm and, under DDP, the ranks' agreed flags) brought to the
host one step late, so that the host never waits for the step it has just queued.

Reading a CUDA value on the host (``.item()``, ``.tolist()``) waits until the device has run
everything queued before it: read after every optimizer step, it drains the device's queue and
the next step's data loading, forward and backward cannot overlap the current step. Instead each
step's values are copied into pinned host memory without blocking, behind a CUDA event, and read
after the *next* step is queued: by then the device has usually finished them, and the host waits
at most for the step that was already running. Where a value is needed now (a log line, a
checkpoint, the end of the run) :meth:`StepReadback.drain` waits for all of them.

On the CPU there is no queue and the copy is a plain one; the order of events is the same on both
devices, so the CPU tests see the schedule a GPU run follows.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class _Pending:
    step: int
    host: torch.Tensor  # the values, in host memory once ``event`` has completed
    event: object  # torch.cuda.Event, or None on the CPU
    on_ready: Callable[[int, list[float]], None]


class StepReadback:
    """Steps' values in the order they were queued; each is handed to its ``on_ready`` once read."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.pending: deque[_Pending] = deque()

    def put(self, step: int, values: torch.Tensor, on_ready: Callable[[int, list[float]], None]) -> None:
        """Start copying ``values`` (1-D, on the device) to the host; nothing waits here."""
        values = values.detach().float().reshape(-1)
        if self.cuda:
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = values.clone(), None
        self.pending.append(_Pending(step, host, event, on_ready))

    def ready(self, keep: int = 1) -> None:
        """Read every step but the latest ``keep`` (0: all, waiting for them). With the default,
        the host waits at most for the step queued before the latest, which the device is running
        or has run."""
        while len(self.pending) > keep:
            self._read(self.pending.popleft())

    def drain(self) -> None:
        self.ready(keep=0)

    def clear(self) -> None:
        """Forget unread steps (the loop is stopping with an error already)."""
        self.pending.clear()

    @staticmethod
    def _read(item: _Pending) -> None:
        if item.event is not None:
            item.event.synchronize()  # this step's copy only, not what was queued after it
        item.on_ready(item.step, item.host.tolist())

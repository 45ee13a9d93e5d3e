"""Decoding ahead of the loop: a background thread turns the loader's encoded batches into decoded ones
up to ``DECODE_AHEAD`` batches early, on its own CUDA stream, handing each over with an event; its
failures reach the loop's thread with their cause, and its stop is bounded (``JOIN_TIMEOUT_S``)."""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time

import torch


log = logging.getLogger("fcmae")
from .device_decoder import DeviceDecoder

log = logging.getLogger("fcmae")

DECODE_AHEAD = 2  # batches the decode thread may have ready before the loop takes them
JOIN_TIMEOUT_S = 10.0  # how long the loop waits for the decode thread to stop at the end of an epoch


class _Failure:
    """An exception of the decode thread, carried to the loop's thread and raised there."""

    def __init__(self, exc: BaseException):
        self.exc = exc


_END = object()


class DeviceBatches:
    """A loader of encoded batches seen as a loader of :class:`~fcmae.data.samples.MaskedBatch` (images on the device).

    The batches are decoded and augmented in a background thread, up to :data:`DECODE_AHEAD` ahead of
    the loop, so the host work of decoding overlaps the training step instead of adding to it. On
    CUDA the thread works on its own stream and hands each batch over with an event that the training
    stream waits on: the host never waits for a decode to finish. An error in the thread (a
    :class:`DataError`, a worker that died) is raised in the loop's thread, as it would have been."""

    def __init__(self, loader, decoder: DeviceDecoder, ahead: int = DECODE_AHEAD):
        self.loader, self.decoder, self.ahead = loader, decoder, ahead
        self.decode_seconds = 0.0  # host CPU time the decode thread spent decoding (benchmarks read it)
        self.batches_decoded = 0

    def __len__(self) -> int:
        return len(self.loader)

    def _decode(self, batch):
        imgs, extra_bad = self.decoder(batch.images, batch.keys)
        bad = batch.bad
        if extra_bad:
            bad = bad.clone()
            bad[0] += extra_bad  # the engine sums a batch's bad counts
        return batch._replace(images=imgs, bad=bad)

    @staticmethod
    def _put(handoff: queue.Queue, item, stop: threading.Event) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, it, handoff: queue.Queue, stop: threading.Event) -> None:
        device = self.decoder.device
        stream = None
        try:  # everything, the stream's setup too: any failure reaches the loop with its cause
            if device.type == "cuda":
                if device.index is not None:  # a bare "cuda" is the current device already
                    torch.cuda.set_device(device)
                stream = torch.cuda.Stream(device)
            for batch in it:
                if stop.is_set():
                    return
                start = time.thread_time()
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    decoded = self._decode(batch)
                    event = None
                    if stream is not None:
                        event = torch.cuda.Event()
                        event.record(stream)
                self.decode_seconds += time.thread_time() - start
                self.batches_decoded += 1
                if not self._put(handoff, (decoded, event), stop):
                    return
            self._put(handoff, _END, stop)
        except BaseException as exc:  # carried to the loop's thread
            self._put(handoff, _Failure(exc), stop)

    @staticmethod
    def _take(handoff: queue.Queue, thread: threading.Thread):
        while True:
            try:
                return handoff.get(timeout=1.0)
            except queue.Empty:
                if not thread.is_alive() and handoff.empty():
                    raise RuntimeError("the device-decode thread stopped without handing over a batch or an error")

    def __iter__(self):
        device = self.decoder.device
        it = iter(self.loader)  # in this thread: the sampler's epoch and start are set here
        handoff: queue.Queue = queue.Queue(maxsize=self.ahead)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(it, handoff, stop), name="fcmae-device-decode",
                                  daemon=True)
        thread.start()
        try:
            while True:
                item = self._take(handoff, thread)
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                batch, event = item
                if event is not None:
                    current = torch.cuda.current_stream(device)
                    current.wait_event(event)  # the training stream waits; the host does not
                    batch.images.record_stream(current)
                yield batch
        finally:
            stop.set()
            thread.join(timeout=JOIN_TIMEOUT_S)
            if thread.is_alive():  # blocked in the loader (a read that does not return): a daemon, left behind
                log.warning("the device-decode thread did not stop within %.0f s (blocked reading a batch?); "
                            "leaving it behind", JOIN_TIMEOUT_S)

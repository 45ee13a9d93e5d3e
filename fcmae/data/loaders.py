"""Loaders: the resumable, rank-sharded sampler, worker setup and shutdown, the train and eval
loaders, and :func:`build_pretrain_loader`, the one place the pretraining input pipeline is built
(``data.decode`` picks the CPU path or :mod:`fcmae.data.device_decode`)."""
from __future__ import annotations

import logging
import os
import signal

import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..storage.run_lock import close_inherited_locks

from . import decode_ahead, device_decode, device_decoder
from .image_io import DataError, channels_of
from .samples import EvalImages, KeyedSamples, PretrainSamples, collate_labelled, collate_masked
from .sources import build_source, check_bands
from .transforms import pretrain_transform

log = logging.getLogger("fcmae.data")


class ResumableSampler(DistributedSampler):
    """DistributedSampler (per-epoch reshuffle) that yields sample keys and can start mid-epoch.

    ``set_start(n)`` skips the first ``n`` samples of this rank in the current
    epoch, so a resumed run neither repeats nor skips samples.
    """

    def __init__(self, dataset: KeyedSamples, num_replicas: int, rank: int, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = start

    def __iter__(self):
        n = len(self.dataset)
        for index in list(super().__iter__())[self.start:]:
            yield self.epoch * n + index

    def __len__(self) -> int:
        return self.num_samples - self.start


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore the signals that stop a run. Slurm, ``timeout``
    and a terminal's Ctrl-C signal the whole process group; a worker that died of it would kill
    the run before its checkpoint. The main process owns shutdown, and workers never outlive it:
    the kernel kills a worker when the main process dies (even by SIGKILL), and a worker drops its
    inherited copy of the run directory's lock (an orphan blocked in a read would otherwise keep it)."""
    for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)
    die_with_parent()
    close_inherited_locks()


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent exits (``prctl(PR_SET_PDEATHSIG)``); elsewhere nothing."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    import multiprocessing
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before the prctl took (adopted since)
        os._exit(1)


def kill_workers() -> None:
    """Kill this process's worker processes at once: a stop must not wait on a worker blocked in a read
    (they ignore SIGTERM, so the polite shutdown's terminate() would leave them, and the interpreter's
    exit would wait on them forever)."""
    import multiprocessing
    _kill(multiprocessing.active_children())


def _kill(children) -> None:
    if not children:
        return
    # torch's SIGCHLD handler would report a worker we killed as a crash: not while we kill them
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        for child in children:
            child.kill()
        for child in children:
            child.join(timeout=5)
    finally:
        signal.signal(signal.SIGCHLD, previous)


def shutdown_workers(loader) -> None:
    """Stop a loader's persistent workers now, the polite way (a "done" message they obey). Needed
    because they ignore SIGTERM (:func:`ignore_stop_signals`): left to interpreter exit,
    multiprocessing would SIGTERM them and then wait for them forever."""
    loader = getattr(loader, "loader", loader)  # decode_ahead.DeviceBatches wraps the DataLoader
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
        # one that did not obey (a blocked read): no waiting on it
        _kill([w for w in getattr(it, "_workers", []) if w.is_alive()])
    if hasattr(loader, "_iterator"):
        loader._iterator = None

def build_train_loader(dataset: KeyedSamples, batch_size: int, num_workers: int, seed: int, rank: int = 0,
                       world_size: int = 1, pin_memory: bool = False, persistent_workers: bool = True,
                       collate_fn=collate_labelled):
    """``(loader, sampler)`` over keyed samples: resumable, sharded, deterministic per sample; batches
    as ``collate_fn`` makes them (labelled samples by default)."""
    per_rank = len(dataset) // world_size
    if per_rank < batch_size:
        raise DataError(
            f"{len(dataset)} images give {per_rank} per process, fewer than data.batch_size={batch_size}; "
            "use more images or a smaller batch"
        )
    sampler = ResumableSampler(dataset, world_size, rank, seed)
    loader = DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        pin_memory=pin_memory, drop_last=True, collate_fn=collate_fn,
        persistent_workers=num_workers > 0 and persistent_workers,
        prefetch_factor=4 if num_workers > 0 else None, worker_init_fn=ignore_stop_signals,
        # Its own generator: creating an iterator (each epoch, and on resume mid-epoch)
        # must not draw from the global RNG that drop path uses.
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler


def build_eval_loader(dataset: EvalImages, batch_size: int, num_workers: int, rank: int = 0, world_size: int = 1):
    """This rank's shard (``rank::world_size``, no padding: every image counted once)."""
    shard = torch.utils.data.Subset(dataset, list(range(rank, len(dataset), world_size)))
    # Its own generator: an iterator draws a base seed, which must not come from the global
    # RNG (drop path's), or evaluating would change the training that follows it.
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers, drop_last=False,
                      generator=torch.Generator().manual_seed(0), worker_init_fn=ignore_stop_signals)


def build_pretrain_loader(data_cfg, mask_ratio: float, seed: int, rank: int = 0, world_size: int = 1,
                          pin_memory: bool = False, device: torch.device | str = "cpu", in_chans: int = 3,
                          patch_size: int = 32):
    """``(loader, sampler, dataset)`` for pretraining; batches are
    :class:`~fcmae.data.samples.MaskedBatch` (:func:`collate_masked`). With
    ``data.decode`` resolving to ``gpu`` (:mod:`fcmae.data.device_decode`) the workers only read JPEG bytes
    and the images arrive already decoded and augmented on ``device``."""
    d, device = data_cfg, torch.device(device)
    channels = channels_of(d, in_chans)
    choice = getattr(d, "decode", "cpu")
    if not channels.plain_rgb and choice == "gpu":
        raise DataError(f"data.decode=gpu decodes 8-bit RGB JPEGs; data.channels={channels.mode} reads every "
                        "file on the CPU: use data.decode=cpu (or auto)")
    decode = device_decode.resolve_decode(choice if channels.plain_rgb else "cpu", d.source, device)
    if decode == "gpu" and device.type == "cuda":
        error = device_decode.device_decode_error(device)
        if error and choice == "auto":
            log.warning("data.decode=auto: %s cannot decode JPEGs (%s); decoding in the loader workers instead",
                        device, error)
            decode = "cpu"
        elif error:
            raise DataError(f"data.decode=gpu: {device} cannot decode JPEGs ({error}); install "
                                       "'fcmae[gpu]' (TorchCodec) or use data.decode=cpu")
    source = build_source(d, seed, channels)
    check_bands(source, channels)
    transform = pretrain_transform(d.img_size, d.crop_scale, d.hflip, d.mean, d.std)
    if decode == "gpu":
        dataset = device_decode.EncodedPretrainSamples(source, transform, d.img_size, mask_ratio, d.crop_scale, d.hflip,
                                                    seed, patch_size)
        collate = device_decode.collate_encoded
    else:
        dataset, collate = PretrainSamples(source, transform, d.img_size, mask_ratio, seed, patch_size), collate_masked
    loader, sampler = build_train_loader(dataset, d.batch_size, d.num_workers, seed, rank, world_size,
                                         pin_memory and d.pin_memory, d.persistent_workers, collate_fn=collate)
    if decode == "gpu":
        decoder = device_decoder.DeviceDecoder(dataset, d.img_size, d.mean, d.std, device)
        loader = decode_ahead.DeviceBatches(loader, decoder)
        if rank == 0:
            log.info("data.decode=gpu: workers read JPEG bytes, %s decodes and augments the batch on %s",
                     decoder.decoder_name, device)
    return loader, sampler, dataset

"""The pretraining loader, built in one place: a source, the input pipeline that ``data.decode``
picks (:mod:`fcmae.data` on the CPU, :mod:`fcmae.gpu_decode` on the device), per-sample masks and
the resumable, rank-sharded sampler."""
from __future__ import annotations

import logging

import torch

from . import gpu_decode
from .data import PretrainSamples, build_source, build_train_loader, collate_masked, pretrain_transform
from .image_io import DataError

log = logging.getLogger(__name__)


def build_pretrain_loader(data_cfg, mask_ratio: float, seed: int, rank: int = 0, world_size: int = 1,
                          pin_memory: bool = False, device: torch.device | str = "cpu"):
    """``(loader, sampler, dataset)`` for pretraining; batches are
    ``(imgs, masks, bad, keys, visible_per_sample)`` (:func:`collate_masked`). With
    ``data.decode`` resolving to ``gpu`` (:mod:`fcmae.gpu_decode`) the workers only read JPEG bytes
    and the images arrive already decoded and augmented on ``device``."""
    d, device = data_cfg, torch.device(device)
    choice = getattr(d, "decode", "cpu")
    decode = gpu_decode.resolve_decode(choice, d.source, device)
    if decode == "gpu" and device.type == "cuda":
        error = gpu_decode.device_decode_error(device)
        if error and choice == "auto":
            log.warning("data.decode=auto: %s cannot decode JPEGs (%s); decoding in the loader workers instead",
                        device, error)
            decode = "cpu"
        elif error:
            raise DataError(f"data.decode=gpu: {device} cannot decode JPEGs ({error}); install "
                                       "'fcmae[gpu]' (TorchCodec) or use data.decode=cpu")
    source = build_source(d, seed)
    transform = pretrain_transform(d.img_size, d.crop_scale, d.hflip, d.mean, d.std)
    if decode == "gpu":
        dataset = gpu_decode.EncodedPretrainSamples(source, transform, d.img_size, mask_ratio, d.crop_scale, d.hflip,
                                                    seed)
        collate = gpu_decode.collate_encoded
    else:
        dataset, collate = PretrainSamples(source, transform, d.img_size, mask_ratio, seed), collate_masked
    loader, sampler = build_train_loader(dataset, d.batch_size, d.num_workers, seed, rank, world_size,
                                         pin_memory and d.pin_memory, d.persistent_workers, collate_fn=collate)
    if decode == "gpu":
        decoder = gpu_decode.DeviceDecoder(dataset, d.img_size, d.mean, d.std, device)
        loader = gpu_decode.DeviceBatches(loader, decoder)
        if rank == 0:
            log.info("data.decode=gpu: workers read JPEG bytes, %s decodes and augments the batch on %s",
                     decoder.decoder_name, device)
    return loader, sampler, dataset

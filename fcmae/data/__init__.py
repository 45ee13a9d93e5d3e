"""The input pipeline, one module per idea (arrows point down this list):

- ``image_io``: reading one image faithfully; :class:`DataError`, which every data problem raises
- ``fashion_mnist``, ``shards``: two on-disk formats (IDX files; tar shards by index)
- ``sources``: what a dataset is (synthetic, folder, image folder, file list, Fashion-MNIST, shards)
- ``transforms``: crop geometry and the pretraining, fine-tuning and evaluation transforms
- ``samples``: per-sample seeds; keyed pretraining / labelled / evaluation samples; batch collation
- ``device_decode``: ``data.decode=gpu``, batched JPEG decode and augmentation on the device
- ``loaders``: the resumable sampler, worker setup, the train / eval loaders and
  :func:`build_pretrain_loader`, the one place the pretraining pipeline is built
- ``shards_pack``: ``fcmae-shards pack`` (writes what ``shards`` reads)
- ``stats``: per-band mean and std (``fcmae-stats``, ``data.mean=auto``)

The apps use the names below; everything else is reached through its module.
"""
from .image_io import Channels, DataError, channels_of
from .loaders import build_eval_loader, build_pretrain_loader, build_train_loader, shutdown_workers
from .samples import EvalImages, LabelledSamples
from .sources import build_source, check_bands, class_names_of, labelled_source, num_classes_of
from .stats import band_stats
from .transforms import eval_transform, finetune_transform

__all__ = ["Channels", "DataError", "EvalImages", "LabelledSamples", "band_stats", "build_eval_loader",
           "build_pretrain_loader", "build_source", "build_train_loader", "channels_of", "check_bands", "class_names_of",
           "eval_transform", "finetune_transform", "labelled_source", "num_classes_of", "shutdown_workers"]

"""What a resume may change, checked against the checkpoint's own config and data. A change that
would alter the run under way without a word is refused or adapted, always with a message naming
the key:

- the keys an app names (the model, the image size, ...) and ``trainer.seed`` (the data order and the
  masks of the epoch under way): refused;
- the effective batch (``data.batch_size``, ``trainer.accum_iter``, ``optim.effective_batch_size``, the
  world size): kept by the accumulation where only the batch size or the world size changed, else
  refused (it sets the lr, the steps per epoch and the data order);
- the lr and the schedule (``optim.blr``, ...): taken, and said (the advice after a blow-up asks for it);
- the data: another root with another image count is another dataset (refused); the same root with
  another count, or another root with the same count, is said.
"""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from ..distributed import DistInfo
from ..errors import ConfigError
from .settings import adapt_to_world_size, checkpoint_world

log = logging.getLogger("fcmae")

REFUSED = ("trainer.seed",)
EXPLICIT_BATCH = ("trainer.accum_iter", "optim.effective_batch_size")
ANNOUNCED = ("optim.blr", "optim.lr", "optim.min_lr", "optim.weight_decay", "optim.clip_grad", "optim.layer_decay",
             "schedule.warmup_epochs", "schedule.warmup_steps", "trainer.epochs")
DATA_ROOTS = ("data.root", "data.train_root")  # pretraining's, fine-tuning's
ANOTHER_RUN = "start another run (run_name=..., or resume=never in a new directory)"


def changed_keys(old: dict, new: dict, keys) -> list[str]:
    """``"key: old -> new"`` for each of ``keys`` whose value differs between two configs."""
    out = []
    old, new = OmegaConf.create(old), OmegaConf.create(new)
    for key in keys:
        a, b = OmegaConf.select(old, key), OmegaConf.select(new, key)
        if a != b:
            out.append(f"{key}: {OmegaConf.to_container(a) if OmegaConf.is_config(a) else a} -> "
                       f"{OmegaConf.to_container(b) if OmegaConf.is_config(b) else b}")
    return out


def check_setup(path, ck: dict, cfg, info: DistInfo, accum: int, effective: int) -> tuple[int, int]:
    """The seed and the effective batch against checkpoint ``ck`` (read from ``path``): returns the
    ``(accum, effective batch)`` the resumed run trains with."""
    old = ck.get("config") or {}
    new = OmegaConf.to_container(cfg, resolve=True)
    refused = changed_keys(old, new, REFUSED) if old else []
    if refused:
        raise ConfigError(f"{path} was trained with another {'; '.join(refused)}: the seed orders the data and "
                          "draws the masks of the epoch under way; continue with the original value, or " + ANOTHER_RUN)
    old_world, old_effective = checkpoint_world(ck)
    if not old_effective or old_effective == effective:
        return accum, effective
    explicit = changed_keys(old, new, EXPLICIT_BATCH) if old else []
    if explicit:
        raise ConfigError(f"{path} was trained with an effective batch of {old_effective}; {'; '.join(explicit)} "
                          f"would make it {effective}, changing the lr, the steps per epoch and the data order of the "
                          "epoch under way: continue with the original values, or " + ANOTHER_RUN)
    accum = adapt_to_world_size(old_world, old_effective, cfg.data.batch_size, info.world_size,
                                run_dir=Path(path).parent.parent)
    what = changed_keys(old, new, ("data.batch_size",)) if old else []
    if old_world != info.world_size:
        what.append(f"processes: {old_world} -> {info.world_size}")
    if info.is_main:
        log.warning("resuming with %s: accumulation %d keeps its effective batch %d (%d x %d x %d), so the lr, the "
                    "schedule and the samples per step are unchanged; the data order within a step and the "
                    "per-process random streams differ from an uninterrupted run", "; ".join(what) or "another setup",
                    accum, old_effective, cfg.data.batch_size, accum, info.world_size)
    return accum, old_effective


def announce_changes(path, ck: dict, cfg, info: DistInfo) -> None:
    """Say which lr and schedule keys differ from the checkpoint's (they take effect from its step on)."""
    old = ck.get("config") or {}
    changed = changed_keys(old, OmegaConf.to_container(cfg, resolve=True), ANNOUNCED) if old else []
    if changed and info.is_main:
        log.warning("resuming %s with %s: in effect from step %d on", path, "; ".join(changed), ck.get("step", 0))


def data_root(config) -> tuple[str | None, object]:
    """``(key, value)`` of the config's data folder (None, None for data without one)."""
    for key in DATA_ROOTS:
        value = OmegaConf.select(OmegaConf.create(config), key, default=None)
        if value is not None:
            return key, value
    return None, None


def check_same_data(path, ck: dict, cfg, images: int, info: DistInfo) -> None:
    """A resumed run must train on the data it started on: another root that holds another number of
    images is another dataset (refused); a changed count or a moved root alone is said."""
    old_images = ck.get("data_images")
    key, old_root = data_root(ck.get("config") or {})
    _, new_root = data_root(OmegaConf.to_container(cfg, resolve=True))
    moved = key is not None and str(old_root) != str(new_root)
    counted = old_images is not None and int(old_images) != images
    if moved and counted:
        raise ConfigError(f"{path} was trained on {key}={old_root} ({old_images} images); {new_root} holds {images}: "
                          f"another dataset does not continue this run. Go back to {key}={old_root}, or "
                          + ANOTHER_RUN)
    if info.is_main and moved:
        log.warning("%s: %s: %s -> %s holds the same number of images (%d): taken as the same data, moved", path,
                    key, old_root, new_root, images)
    elif info.is_main and counted:
        log.warning("the data changed since %s: %d images then, %d now; the steps per epoch and the schedule's "
                    "length follow the new count", path, old_images, images)

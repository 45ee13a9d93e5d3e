"""What the loop is told, derived from the config and the world: precision for the device, the
accumulation behind the effective batch (kept across a change of world size on resume), and the
schedule's steps."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import ConfigError
from ..engine import LoopSettings

log = logging.getLogger("fcmae")


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision in ("bf16", "fp16") and device.type != "cuda":
        raise ConfigError(f"trainer.precision={precision} needs a GPU; on CPU use trainer.precision=fp32")
    return precision


def resolve_accumulation(cfg, world_size: int) -> tuple[int, int]:
    """``(accum, effective_batch)``; with optim.effective_batch_size the accumulation is derived."""
    per_step = cfg.data.batch_size * world_size
    target = cfg.optim.effective_batch_size
    if target is None:
        return cfg.trainer.accum_iter, per_step * cfg.trainer.accum_iter
    if target % per_step:
        hint = _dividing_batch(target, world_size, cfg.data.batch_size)
        raise ConfigError(
            f"optim.effective_batch_size={target} is not a multiple of data.batch_size x world size = "
            f"{cfg.data.batch_size} x {world_size} = {per_step}; choose a batch size that divides it "
            f"(e.g. data.batch_size={hint})"
        )
    accum = target // per_step
    if cfg.trainer.accum_iter not in (1, accum):
        log.warning("trainer.accum_iter=%d is ignored: optim.effective_batch_size=%d sets the accumulation to %d "
                    "(%d x %d x %d); drop one of the two", cfg.trainer.accum_iter, target, accum,
                    cfg.data.batch_size, world_size, accum)
    return accum, target


def _dividing_batch(effective: int, world_size: int, at_most: int) -> int:
    """The largest per-process batch <= ``at_most`` that ``effective`` splits into on ``world_size``."""
    return max((b for b in range(1, at_most + 1) if effective % (b * world_size) == 0), default=1)


def adapt_to_world_size(old_world: int, old_effective: int, batch_size: int, world_size: int,
                        run_dir: Path | str | None = None) -> int:
    """The accumulation that keeps a resumed run's effective batch (and so its lr and schedule) on
    ``world_size`` processes; :class:`ConfigError` with both ways forward when none does."""
    per_step = batch_size * world_size
    if old_effective % per_step == 0:
        return old_effective // per_step
    hint = _dividing_batch(old_effective, world_size, old_effective // world_size)
    raise ConfigError(
        f"this run was trained with an effective batch of {old_effective} on {old_world} process(es); on "
        f"{world_size} it cannot be kept with data.batch_size={batch_size} ({old_effective} is not a multiple of "
        f"{batch_size} x {world_size}): resume on {old_world} process(es), or set data.batch_size to one that "
        f"divides it (e.g. {hint}) so that the accumulation makes up the rest"
        + (f", with hydra.run.dir={run_dir} (data.batch_size names the run directory: without it a new run starts at "
           "step 0)" if run_dir is not None else ""))


def loop_settings(cfg, micro_per_epoch: int, accum: int, base_lr: float, precision: str,
                  max_bad_fraction: float, callbacks) -> LoopSettings:
    """Steps per epoch, schedule length, stop step and warmup from the config.

    ``trainer.max_steps`` below the schedule's end (epochs x steps per epoch) stops early on the
    same schedule; beyond it, the cosine is stretched to end at ``max_steps``, so "the same
    command with a larger max_steps" makes a run longer (a finished run's lr rises again to the
    stretched curve's value at its step: a warm restart, logged)."""
    t = cfg.trainer
    steps_per_epoch = micro_per_epoch // accum
    if steps_per_epoch < 1:
        raise ConfigError(f"one epoch has {micro_per_epoch} batches per process, fewer than the accumulation "
                          f"({accum}); use more data or a smaller optim.effective_batch_size")
    epoch_steps = t.epochs * steps_per_epoch
    total_steps = max(epoch_steps, t.max_steps or 0)
    if total_steps > epoch_steps:
        log.info("trainer.max_steps=%d is beyond the %d steps of trainer.epochs=%d: the cosine schedule is "
                 "stretched to end at step %d", t.max_steps, epoch_steps, t.epochs, total_steps)
    warmup = cfg.schedule.warmup_steps if cfg.schedule.warmup_steps is not None \
        else int(round(cfg.schedule.warmup_epochs * steps_per_epoch))
    return LoopSettings(
        total_steps=total_steps, stop_step=t.max_steps or total_steps,
        steps_per_epoch=steps_per_epoch, accum=accum, base_lr=base_lr, min_lr=cfg.optim.min_lr,
        warmup_steps=warmup, batch_size=cfg.data.batch_size, precision=precision, clip_grad=cfg.optim.clip_grad,
        log_every=t.log_every, ckpt_every=t.ckpt_every, max_bad_fraction=max_bad_fraction, progress=t.progress,
        callbacks=list(callbacks), stretched=total_steps > epoch_steps, divergence_stop=t.divergence_stop,
        read_timeout=cfg.data.read_timeout)



"""Every range check of an app's config, in one call that reports every problem at once: the config's
own (:mod:`fcmae.config.checks`) and those of the modules that own a value (channels and bands:
:mod:`fcmae.data.image_io`; the fine-tuning transform: :mod:`fcmae.data.transforms`; the divergence
bound: :mod:`fcmae.engine.state`)."""
from __future__ import annotations

from typing import Any

from ..config.checks import check_finetune, check_pretrain, collector, raise_if_any
from ..data.image_io import check_channels
from ..data.transforms import check_finetune_transform
from ..engine.state import check_divergence_stop


def validate(cfg: Any) -> None:
    """``fcmae-pretrain``'s config; :class:`ConfigError` listing every problem with its fix."""
    errors, check = collector()
    check_pretrain(cfg, errors, check)
    check_channels(cfg.data, cfg.model.in_chans, check, auto_stats=True)
    check_divergence_stop(cfg.trainer.divergence_stop, check)
    raise_if_any(errors)


def validate_finetune(cfg: Any) -> None:
    """``fcmae-finetune``'s config; :class:`ConfigError` listing every problem with its fix."""
    errors, check = collector()
    check_finetune(cfg, errors, check)
    check_channels(cfg.data, cfg.model.in_chans, check, auto_stats=True, from_source=True)
    check_divergence_stop(cfg.trainer.divergence_stop, check)
    if not errors:  # the transform is built only from values that passed their own checks (placeholder stats)
        check_finetune_transform(_with_placeholder_stats(cfg.data, cfg.model.in_chans), errors)
    raise_if_any(errors)



def _with_placeholder_stats(d, in_chans: int):
    """``d`` with unit statistics where the real ones are resolved only at start (null, auto)."""
    from omegaconf import OmegaConf
    if isinstance(d.mean, (list, tuple)) or OmegaConf.is_list(d.mean):
        if isinstance(d.std, (list, tuple)) or OmegaConf.is_list(d.std):
            return d
    return OmegaConf.merge(d, {"mean": [0.0] * in_chans, "std": [1.0] * in_chans})

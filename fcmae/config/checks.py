"""Range checks of the config's own values, collected so one run reports every problem at once. The
values owned elsewhere are checked there (channels and bands by :mod:`fcmae.data.image_io`, the
fine-tuning transform by :mod:`fcmae.data.transforms`); :mod:`fcmae.run.validation` runs them all."""
from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Callable

from omegaconf import OmegaConf

from ..errors import ConfigError
from ..models.masking import image_shape
from ..models.variants import VARIANTS
from ..optim import LAYER_DECAY_TYPES
from ..sparse import BACKENDS, DWCONV, GRN_STATS
from .schemas import (CHECKPOINTING_CHOICES, COMPILE_CHOICES, DECODE_CHOICES, LABELLED_SOURCES, LOGGERS, PRETRAIN_SOURCES,
                      ROOTED_LABELLED, FinetuneConfig, PretrainConfig)

Check = Callable[[bool, str], None]


def collector():
    """``(errors, check)``: ``check(ok, msg)`` records ``msg`` when ``ok`` is false, so one
    run reports every problem at once."""
    errors: list[str] = []

    def check(ok: bool, msg: str) -> None:
        if not ok:
            errors.append(msg)
    return errors, check


def raise_if_any(errors: list[str]) -> None:
    """One :class:`ConfigError` listing every problem collected."""
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


def _dotted_keys(node, prefix: str = "") -> list[str]:
    out = []
    for key in node.keys():
        child = node._get_node(key)
        full = f"{prefix}{key}"
        out.append(full)
        if OmegaConf.is_dict(child) and dataclasses.is_dataclass(OmegaConf.get_type(child)):
            out += _dotted_keys(child, full + ".")
    return out


def _unknown_keys(node, ref, prefix: str = "") -> list[str]:
    out, declared = [], set(ref.keys())  # keys(), not "in": a key whose value is ??? is not "in" its config
    for key in node.keys():
        full = f"{prefix}{key}"
        if key not in declared:
            out.append(full)
            continue
        child, ref_child = node._get_node(key), ref._get_node(key)
        if OmegaConf.is_dict(child) and OmegaConf.is_dict(ref_child) and \
                dataclasses.is_dataclass(OmegaConf.get_type(ref_child)):
            out += _unknown_keys(child, ref_child, full + ".")
    return out


def check_known_keys(cfg: Any, schema: type, check: Check) -> None:
    """Every key is one the app's schema declares. Hydra's type check refuses a misspelled key, but
    ``+key=value`` (the fix Hydra itself suggests) adds it anyway, and the app would never read it."""
    if not OmegaConf.is_config(cfg):
        return
    ref = OmegaConf.structured(schema)
    known = _dotted_keys(ref)
    for key in _unknown_keys(cfg, ref):
        near = difflib.get_close_matches(key, known, n=1)
        check(False, f"{key} is not a key of this app, so it would be ignored"
                     f"{f' (did you mean {near[0]}?)' if near else ''}: remove it, or fix its name "
                     "(a + in front adds keys the app never reads)")


def check_pretrain(cfg: Any, errors: list[str], check: Check) -> None:
    """``fcmae-pretrain``'s own values (the channel checks are the data's)."""
    check_known_keys(cfg, PretrainConfig, check)
    m, d = cfg.model, cfg.data
    check(0.0 <= m.mask_ratio < 1.0, f"model.mask_ratio={m.mask_ratio} must be in [0, 1)")
    check(len(m.depths) == 4 and len(m.dims) == 4, "model.depths and model.dims need 4 entries each")
    check(m.decoder_depth >= 1 and m.decoder_embed_dim >= 1, "model.decoder_depth and decoder_embed_dim must be >= 1")
    check(cfg.encoder.backend in BACKENDS,
          f"encoder.backend={cfg.encoder.backend!r}; use {', '.join(BACKENDS[:-1])} or {BACKENDS[-1]}")
    check(cfg.trainer.activation_checkpointing == "off" or cfg.encoder.backend == "sparse",
          f"trainer.activation_checkpointing={cfg.trainer.activation_checkpointing} recomputes the sparse backend's "
          f"blocks; encoder.backend={cfg.encoder.backend} has none to recompute: use encoder.backend=sparse or "
          "trainer.activation_checkpointing=off")
    check(cfg.encoder.dwconv in DWCONV, f"encoder.dwconv={cfg.encoder.dwconv!r}; use auto, canvas or tiles")
    check(cfg.encoder.grn_stats in GRN_STATS, f"encoder.grn_stats={cfg.encoder.grn_stats!r}; use {' or '.join(GRN_STATS)}")
    if cfg.encoder.backend == "minkowski":
        try:
            from ..sparse.me_compat import import_minkowski
            import_minkowski()
        except ImportError as exc:
            errors.append(str(exc))
    p = m.patch_size
    check(isinstance(p, int) and p > 0 and p % 8 == 0,
          f"model.patch_size={p} must be a positive multiple of 8 (32, 16 or 8: the stem's stride is patch_size / 8)")
    p = p if isinstance(p, int) and p > 0 else 32
    hw = _image_shape(d.img_size, check)
    if hw is not None:
        check(_fits(hw, p), f"data.img_size={_said(d.img_size)} must be positive multiples of model.patch_size={p} "
                            f"(e.g. {7 * p} or [{7 * p}, {5 * p}])")
        if _fits(hw, p):
            patches = (hw[0] // p) * (hw[1] // p)
            check(int(patches * (1 - m.mask_ratio)) >= 1,
                  f"model.mask_ratio={m.mask_ratio} leaves no visible patch at data.img_size={_said(d.img_size)}")
    check(d.batch_size > 0, f"data.batch_size={d.batch_size} must be > 0")
    check(d.num_workers >= 0, f"data.num_workers={d.num_workers} must be >= 0")
    check(d.source in PRETRAIN_SOURCES, f"data.source={d.source!r}; use one of {', '.join(PRETRAIN_SOURCES)}")
    check(d.decode in DECODE_CHOICES, f"data.decode={d.decode!r}; use auto, cpu or gpu")
    check(d.source in ("synthetic", "fashion_mnist") or bool(d.root) or cfg.eval_only,
          f"data.source={d.source} needs data.root=/path/to/images")
    check(not cfg.eval_only or cfg.eval.name != "none",
          "eval_only=true scores a run with an evaluation: add eval=knn, eval=linear or eval=knn+linear")
    check(d.source != "synthetic" or d.synthetic_images >= d.batch_size,
          "data.synthetic_images must be at least data.batch_size")
    check(d.stats_images >= 1, f"data.stats_images={d.stats_images} must be >= 1")
    vb = cfg.vis.bands
    check(vb is None or (len(vb) in (1, 3) and all(0 <= b < m.in_chans for b in vb)),
          f"vis.bands={vb}: one or three band indices below model.in_chans={m.in_chans}")
    _check_eval(cfg.eval, check, p)
    _check_training(cfg, check)
    known = {f"convnextv2_{k}" for k in VARIANTS}
    check(m.name in known or m.name.startswith("custom"), f"model.name={m.name!r}; use one of {sorted(known)} or custom_*")
    if m.name in known:
        v = VARIANTS[m.name.removeprefix("convnextv2_")]
        check(list(m.depths) == list(v.depths) and list(m.dims) == list(v.dims),
              f"model.depths/dims do not match {m.name}; select the size with model={m.name} "
              "rather than overriding depths/dims, or name a custom shape model.name=custom_...")


def _image_shape(img_size, check) -> tuple[int, int] | None:
    """``data.img_size`` as ``(H, W)``, or None after saying what is wrong with it."""
    try:
        return image_shape(OmegaConf.to_container(img_size) if OmegaConf.is_config(img_size) else img_size)
    except ValueError as exc:
        check(False, str(exc))
        return None


def _fits(hw: tuple[int, int], patch: int) -> bool:
    """Both sides positive multiples of the patch."""
    return min(hw) > 0 and hw[0] % patch == 0 and hw[1] % patch == 0


def _said(img_size) -> str:
    return str(list(img_size)) if OmegaConf.is_config(img_size) or isinstance(img_size, (list, tuple)) else str(img_size)


def _check_eval(e, check, patch_size: int = 32) -> None:
    check(e.name in ("none", "knn", "linear", "knn+linear"), f"eval.name={e.name!r}; use eval=none, knn, linear or knn+linear")
    if e.name == "none":
        return
    check(e.source in LABELLED_SOURCES, f"eval.source={e.source!r}; use one of {', '.join(LABELLED_SOURCES)}")
    check(e.source not in ROOTED_LABELLED or (bool(e.train_root) and bool(e.val_root)),
          f"eval.source={e.source} needs eval.train_root=... and eval.val_root=... (folders, or list files)")
    check(all(n is None or n > 0 for n in (e.labels_per_class, e.val_per_class)),
          "eval.labels_per_class and eval.val_per_class must be > 0 (or null: all images)")
    hw = None if e.img_size is None else _image_shape(e.img_size, check)
    check(hw is None or _fits(hw, patch_size),
          f"eval.img_size must be a multiple of model.patch_size={patch_size}")
    check(0 < e.crop_pct <= 1, "eval.crop_pct must be in (0, 1]")
    check(min(e.batch_size, e.every_epochs, e.k, e.linear_steps) > 0,
          "eval.batch_size, every_epochs, k and linear_steps must be > 0")
    check(e.temperature > 0 and e.linear_lr > 0, "eval.temperature and eval.linear_lr must be > 0")


# The largest float32: optimizer arithmetic (lr, weight decay, betas) runs in float32 tensors.
FLOAT32_MAX = 3.4028234663852886e38


def _floats(node, prefix: str = ""):
    """``(key, value)`` of every float in a plain (dict/list) config tree."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        key = f"{prefix}[{k}]" if isinstance(k, int) else f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, float):
            yield key, v
        else:
            yield from _floats(v, key)


def _check_training(cfg, check) -> None:
    """Checks of what both apps share: optim, schedule, trainer, logger, launcher and the
    common model and data keys."""
    o, t, m, d = cfg.optim, cfg.trainer, cfg.model, cfg.data
    for key, value in _floats(OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)):
        check(math.isfinite(value) and abs(value) <= FLOAT32_MAX,
              f"{key}={value} is not a finite float32 value (|x| <= 3.4e38): the training arithmetic would "
              "overflow; use a sane value")
    check(0.0 <= m.drop_path_rate < 1.0, f"model.drop_path_rate={m.drop_path_rate} must be in [0, 1)")
    check(0.0 <= d.max_bad_fraction < 1.0, "data.max_bad_fraction must be in [0, 1)")
    check(d.read_timeout is None or d.read_timeout >= 0,
          f"data.read_timeout={d.read_timeout} must be >= 0 seconds (0 or null: no bound)")
    check(len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1,
          f"data.crop_scale={list(d.crop_scale)} must be [min, max] within (0, 1]")
    check(o.name == "adamw", f"optim.name={o.name!r}; only adamw is supported")
    check(o.blr > 0 and (o.lr is None or o.lr > 0), "optim.blr / optim.lr must be > 0")
    check(o.min_lr >= 0 and o.weight_decay >= 0, "optim.min_lr and optim.weight_decay must be >= 0")
    check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas={list(o.betas)} must be two values in [0, 1)")
    check(o.effective_batch_size is None or o.effective_batch_size > 0, "optim.effective_batch_size must be > 0")
    check(o.clip_grad is None or o.clip_grad > 0, "optim.clip_grad must be > 0 (or null to disable)")
    check(cfg.schedule.name == "cosine", f"schedule.name={cfg.schedule.name!r}; only cosine is supported")
    check(cfg.schedule.warmup_epochs >= 0, "schedule.warmup_epochs must be >= 0")
    check(t.epochs > 0, f"trainer.epochs={t.epochs} must be > 0")
    check(t.max_steps is None or t.max_steps > 0, f"trainer.max_steps={t.max_steps} must be > 0")
    check(t.accum_iter > 0, f"trainer.accum_iter={t.accum_iter} must be > 0")
    check(t.precision in ("auto", "fp32", "bf16", "fp16"), f"trainer.precision={t.precision!r}; use auto, fp32, bf16 or fp16")
    check(t.device in ("auto", "cpu", "cuda"), f"trainer.device={t.device!r}; use auto, cpu or cuda")
    check(t.progress in ("auto", "bar", "log"), f"trainer.progress={t.progress!r}; use auto, bar or log")
    check(str(t.compile).lower() in COMPILE_CHOICES, f"trainer.compile={t.compile!r}; use auto, true or false")
    check(t.activation_checkpointing in CHECKPOINTING_CHOICES,
          f"trainer.activation_checkpointing={t.activation_checkpointing!r}; use off, stage or block")
    check(t.memory_plan in ("auto", "on", "off"), f"trainer.memory_plan={t.memory_plan!r}; use auto, on or off")
    check(min(t.log_every, t.vis_every, t.ckpt_every, t.keep_checkpoints) > 0,
          "trainer.log_every, vis_every, ckpt_every and keep_checkpoints must be > 0")
    check(cfg.logger.name in LOGGERS, f"logger.name={cfg.logger.name!r}; use logger=none, wandb, tensorboard or "
          "wandb+tensorboard")
    check(cfg.logger.mode in ("auto", "online", "offline", "disabled"),
          f"logger.mode={cfg.logger.mode!r}; use auto, online, offline or disabled")
    la = cfg.launcher
    check(min(la.nodes, la.tasks_per_node, la.cpus_per_task, la.timeout_min) > 0 and la.gpus_per_node >= 0,
          "launcher.nodes, tasks_per_node, cpus_per_task and timeout_min must be > 0 (gpus_per_node >= 0)")
    # A warning due before the job starts would requeue it at once, again and again.
    check(0 <= la.signal_delay_s < la.timeout_min * 60,
          f"launcher.signal_delay_s={la.signal_delay_s} must be >= 0 and shorter than launcher.timeout_min "
          f"({la.timeout_min} min); raise timeout_min or lower signal_delay_s")


def check_finetune(cfg: Any, errors: list[str], check: Check) -> None:
    """``fcmae-finetune``'s own values (the channel and transform checks are the data's)."""
    check_known_keys(cfg, FinetuneConfig, check)
    m, d, mx = cfg.model, cfg.data, cfg.mixup
    known = {f"convnextv2_{k}" for k in VARIANTS}
    check(m.name in known, f"model.name={m.name!r}; use one of {sorted(known)}")
    check(m.num_classes is None or m.num_classes > 1, "model.num_classes must be > 1 (or null: from the data)")
    check(d.source in LABELLED_SOURCES, f"data.source={d.source!r}; use one of {', '.join(LABELLED_SOURCES)}")
    if cfg.eval_only:
        check(d.source not in ROOTED_LABELLED or bool(d.val_root),
              f"eval_only=true with data.source={d.source} needs data.val_root=...")
    else:
        check(d.source not in ROOTED_LABELLED or (bool(d.train_root) and bool(d.val_root)),
              f"data.source={d.source} needs data.train_root=... and data.val_root=... "
              "(class folders root/<class>/<image>, or for filelist text files of 'path class_name' lines)")
    check(d.labels_per_class is None or d.labels_per_class > 0,
          "data.labels_per_class must be > 0 (or null: every training image)")
    check(d.val_per_class is None or d.val_per_class > 0,
          "data.val_per_class must be > 0 (or null: every validation image)")
    p = cfg.model.patch_size
    check(p is None or (isinstance(p, int) and p > 0 and p % 8 == 0),
          f"model.patch_size={p} must be null (from model.init_from) or a positive multiple of 8 (32, 16, 8)")
    p = p if isinstance(p, int) and p > 0 else 8  # null: checked again once resolved
    hw = _image_shape(d.img_size, check)
    check(hw is None or _fits(hw, p),
          f"data.img_size={_said(d.img_size)} must be positive multiples of {p} (model.patch_size"
          + ("; null: read from model.init_from, checked again then)" if cfg.model.patch_size is None else ")"))
    check(d.batch_size > 0 and d.num_workers >= 0, "data.batch_size must be > 0 and data.num_workers >= 0")
    check(0 < d.crop_pct <= 1, "data.crop_pct must be in (0, 1]")
    check(0.0 <= d.re_prob <= 1.0 and d.re_count >= 1 and d.re_mode in ("const", "rand", "pixel"),
          "data.re_prob must be in [0, 1], data.re_count >= 1, data.re_mode const, rand or pixel")
    check(d.interpolation in ("bicubic", "bilinear", "nearest", "random"),
          f"data.interpolation={d.interpolation!r}; use bicubic, bilinear, nearest or random")
    check(d.color_jitter is None or d.color_jitter >= 0, "data.color_jitter must be >= 0 (or null)")
    check(0 < cfg.optim.layer_decay <= 1.0, f"optim.layer_decay={cfg.optim.layer_decay} must be in (0, 1]")
    check(cfg.optim.layer_decay_type in LAYER_DECAY_TYPES,
          f"optim.layer_decay_type={cfg.optim.layer_decay_type!r}; use one of {', '.join(LAYER_DECAY_TYPES)}")
    check(mx.mixup >= 0 and mx.cutmix >= 0 and 0 <= mx.prob <= 1 and 0 <= mx.switch_prob <= 1,
          "mixup.mixup/cutmix must be >= 0, mixup.prob and switch_prob in [0, 1]")
    check(0 <= mx.label_smoothing < 1, "mixup.label_smoothing must be in [0, 1)")
    check(not (mx.mixup > 0 or mx.cutmix > 0) or d.batch_size % 2 == 0,
          f"mixup/cutmix pair images within a batch: data.batch_size={d.batch_size} must be even")
    check(cfg.eval_every > 0, "eval_every must be > 0")
    check(0.0 < cfg.ema.decay < 1.0, f"ema.decay={cfg.ema.decay} must be in (0, 1)")
    check(not cfg.ema.eval or cfg.ema.enabled, "ema.eval=true needs ema.enabled=true")
    _check_training(cfg, check)


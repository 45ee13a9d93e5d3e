"""``fcmae-pretrain``: the Hydra app. Builds every object from the config, in this one place.

    fcmae-pretrain                                   # ~3 min CPU demo on built-in synthetic images
    fcmae-pretrain trainer.max_steps=200             # the same run, continued to step 200
    fcmae-pretrain experiment=in1k_fcmae model=convnextv2_base data.root=/data/imagenet/train
    fcmae-pretrain -m model.mask_ratio=0.4,0.6,0.75  # a sweep, one run directory per value
"""
from __future__ import annotations

import logging
import math
import os
import random
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .checkpoint import CheckpointManager, load_checkpoint, restore_rng
from .config import ConfigError, register_configs, validate
from .convert import CheckpointError, load_state_dict_file, to_canonical
from .data import DataError, build_pretrain_loader
from .distributed import DistInfo, cleanup, init_distributed
from .engine import DataQualityError, LoopSettings, LoopState, NonFiniteLoss, Preempted, PretrainLoop
from .loggers import MetricsFile, NullLogger, WandbLogger
from .models.fcmae import FCMAE
from .models.masking import num_visible
from .optim import build_optimizer

log = logging.getLogger("fcmae")

# Config keys that must match to continue a run from its checkpoint.
_RESUME_MUST_MATCH = ("model", "encoder", "data.img_size")

_SOURCE_CONF = Path(__file__).resolve().parents[1] / "conf"
CONFIG_PATH = str(_SOURCE_CONF) if _SOURCE_CONF.is_dir() else "pkg://fcmae.conf"


def build_model(cfg) -> FCMAE:
    m = cfg.model
    return FCMAE(depths=list(m.depths), dims=list(m.dims), decoder_depth=m.decoder_depth,
                 decoder_embed_dim=m.decoder_embed_dim, mask_ratio=m.mask_ratio, norm_pix_loss=m.norm_pix_loss,
                 drop_path_rate=m.drop_path_rate, backend=cfg.encoder.backend, grn_stats=cfg.encoder.grn_stats)


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
        raise ConfigError(
            f"optim.effective_batch_size={target} is not a multiple of data.batch_size x world size = "
            f"{cfg.data.batch_size} x {world_size} = {per_step}; choose a batch size that divides it "
            f"(e.g. data.batch_size={_divisor_hint(target, world_size, cfg.data.batch_size)})"
        )
    return target // per_step, target


def _divisor_hint(target: int, world: int, batch: int) -> int:
    best = 1
    for b in range(1, batch + 1):
        if target % (b * world) == 0:
            best = b
    return best


def _changed_keys(old: dict, new: dict, keys) -> list[str]:
    out = []
    old, new = OmegaConf.create(old), OmegaConf.create(new)
    for key in keys:
        a, b = OmegaConf.select(old, key), OmegaConf.select(new, key)
        if a != b:
            out.append(f"{key}: {OmegaConf.to_container(a) if OmegaConf.is_config(a) else a} -> "
                       f"{OmegaConf.to_container(b) if OmegaConf.is_config(b) else b}")
    return out


def load_encoder_init(model: FCMAE, path: str) -> None:
    """Encoder weights from any layout the converter reads; the decoder stays fresh."""
    canonical, layout = to_canonical(load_state_dict_file(path), source=path)
    missing, unexpected = model.encoder.load_state_dict(canonical, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"init_from={path}: encoder shape differs from model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]}); pick the matching model=")
    log.info("initialised the encoder from %s (%s layout); fresh decoder", path, layout)


def run(cfg: DictConfig, run_dir: str | Path, callbacks=()) -> LoopState:
    """Pretrain as configured, in ``run_dir``; returns the final loop state."""
    validate(cfg)
    run_dir = Path(run_dir)
    info = init_distributed(cfg.trainer.device)
    try:
        return _run(cfg, run_dir, info, list(callbacks))
    finally:
        cleanup()


def _run(cfg, run_dir: Path, info: DistInfo, callbacks) -> LoopState:
    t = cfg.trainer
    config = OmegaConf.to_container(cfg, resolve=True)
    precision = resolve_precision(t.precision, info.device)
    accum, eff_batch = resolve_accumulation(cfg, info.world_size)
    base_lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.blr * eff_batch / 256

    ckpt = CheckpointManager(run_dir, keep=t.keep_checkpoints)
    resume_path = None
    if cfg.resume == "auto":
        resume_path = ckpt.last if ckpt.exists() else None
    elif cfg.resume != "never":
        resume_path = Path(cfg.resume)
        if not resume_path.is_file():
            raise ConfigError(f"resume={cfg.resume}: no such checkpoint file (use resume=auto or resume=never)")
    elif ckpt.exists():
        raise ConfigError(f"{run_dir} already holds checkpoints and resume=never would overwrite them; "
                          "use resume=auto to continue, or another run_name")

    # Data first: a bad data.root fails before a model is built.
    loader, sampler, dataset = build_pretrain_loader(
        cfg.data, cfg.model.mask_ratio, t.seed, info.rank, info.world_size, pin_memory=info.device.type == "cuda")
    micro_per_epoch = len(sampler) // cfg.data.batch_size
    steps_per_epoch = micro_per_epoch // accum
    if steps_per_epoch < 1:
        raise ConfigError(f"one epoch has {micro_per_epoch} batches per process, fewer than the accumulation "
                          f"({accum}); use more data or a smaller optim.effective_batch_size")
    total_steps = t.epochs * steps_per_epoch
    stop_step = min(total_steps, t.max_steps) if t.max_steps else total_steps
    warmup = cfg.schedule.warmup_steps if cfg.schedule.warmup_steps is not None \
        else int(round(cfg.schedule.warmup_epochs * steps_per_epoch))

    torch.manual_seed(t.seed)
    random.seed(t.seed)
    model = build_model(cfg).to(info.device)
    if cfg.init_from and resume_path is None:
        load_encoder_init(model, cfg.init_from)
    optimizer = build_optimizer(model, cfg.optim, base_lr)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    state = LoopState()
    if resume_path is not None:
        ck = load_checkpoint(resume_path)
        changed = _changed_keys(ck.get("config", {}), config, _RESUME_MUST_MATCH)
        if changed:
            raise ConfigError(f"{resume_path} was trained with a different setup ({'; '.join(changed)}); "
                              "continue with the original settings, or start another run (run_name=...)")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        state = LoopState(ck["step"], ck["epoch"], ck["batch_in_epoch"], ck.get("bad_images", 0),
                          ck.get("seen_images", 0))
        rngs = ck.get("rng") or []
        if len(rngs) == info.world_size:
            restore_rng(rngs[info.rank])
        else:
            log.warning("checkpoint has RNG states for %d processes, this run has %d: reseeding",
                        len(rngs), info.world_size)
            torch.manual_seed(t.seed + info.rank + state.step)
        log.info("resumed from %s at step %d (epoch %d, batch %d)", resume_path, state.step, state.epoch,
                 state.batch_in_epoch)
    else:
        torch.manual_seed(t.seed + info.rank)  # drop-path draws differ per rank

    train_model = model
    if t.compile:
        train_model = torch.compile(train_model)
    if info.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)

    tracker = NullLogger()
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(config), run_dir / "config.yaml")
        if cfg.logger.name == "wandb":
            tracker = WandbLogger(cfg.logger, cfg.run_name, config, run_dir)
    log.info("run directory %s | %s, %d process(es) on %s, %s | effective batch %d (%d x %d x %d), lr %.3e | "
             "%d steps/epoch, stopping at step %d of %d", run_dir, cfg.model.name, info.world_size, info.device,
             precision, eff_batch, cfg.data.batch_size, accum, info.world_size, base_lr, steps_per_epoch,
             stop_step, total_steps)

    settings = LoopSettings(
        total_steps=total_steps, stop_step=stop_step, steps_per_epoch=steps_per_epoch, accum=accum,
        base_lr=base_lr, min_lr=cfg.optim.min_lr, warmup_steps=warmup,
        visible_per_sample=num_visible((cfg.data.img_size // 32) ** 2, cfg.model.mask_ratio),
        batch_size=cfg.data.batch_size, precision=precision, clip_grad=cfg.optim.clip_grad,
        log_every=t.log_every, vis_every=t.vis_every, ckpt_every=t.ckpt_every,
        max_bad_fraction=cfg.data.max_bad_fraction, norm_pix=cfg.model.norm_pix_loss,
        mean=tuple(cfg.data.mean), std=tuple(cfg.data.std), progress=t.progress,
        image_every=cfg.logger.image_every, callbacks=callbacks)
    loop = PretrainLoop(train_model, model, optimizer, scaler, loader, sampler, settings, state, info, ckpt,
                        MetricsFile(run_dir), tracker, config, run_dir)
    try:
        final = loop.run()
    except NonFiniteLoss as exc:
        last = f"{ckpt.last} (step {load_checkpoint(ckpt.last)['step']})" if ckpt.exists() else "none yet"
        raise NonFiniteLoss(f"{exc}; the weights were not updated and the last good checkpoint is {last}. "
                            "Lower optim.blr, set optim.clip_grad, or use trainer.precision=fp32") from None
    finally:
        tracker.finish()
    if info.is_main:
        log.info("done: step %d, checkpoint %s; export with: fcmae-export %s --format timm", final.step,
                 ckpt.last, run_dir)
    return final


register_configs()


def _hydra_entry():
    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(config_path=CONFIG_PATH, config_name="pretrain", version_base=None)
    def _main(cfg: DictConfig) -> None:
        run_dir = HydraConfig.get().runtime.output_dir
        try:
            run(cfg, run_dir)
        except Preempted as exc:
            log.warning("%s; run the same command again to resume", exc)
            sys.exit(128 + int(exc.signum))
        except (ConfigError, DataError, CheckpointError, NonFiniteLoss, DataQualityError) as exc:
            log.error("%s", exc)
            sys.exit(1)

    _main()


def main() -> None:
    _hydra_entry()


if __name__ == "__main__":
    main()

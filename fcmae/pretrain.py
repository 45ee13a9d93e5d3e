"""``fcmae-pretrain``: the Hydra app. Builds every object from the config, in this one place.

    fcmae-pretrain                                   # ~1 min CPU demo on built-in synthetic images
    fcmae-pretrain trainer.max_steps=400             # the same run, made longer (the schedule stretches)
    fcmae-pretrain eval=knn eval_only=true           # score the finished run (RUN_DIR/evals.jsonl)
    fcmae-pretrain experiment=in1k_fcmae model=convnextv2_base data.root=/data/imagenet/train
    fcmae-pretrain -m model.mask_ratio=0.4,0.6,0.75  # a sweep, one run directory per value
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

import torch

from .config import CONFIG_PATH, ConfigError, auto_band_stats, register_configs, validate
from .checkpoint import read_checkpoint
from .files import append_line
from .export.convert import adapt_stem, to_canonical
from .weights_file import CheckpointError
from .data import band_stats, build_pretrain_loader, build_source, channels_of, check_bands
from .distributed import DistInfo, broadcast_object, cleanup, init_distributed
from .engine import LoopState, RunParts, Task, TrainLoop
from .evaluation import build_evaluator
from .models.fcmae import FCMAE
from .optim import adamw, param_groups
from .run_lock import RunLock
from .runner import (hydra_entry, loop_settings, open_tracker, prepare_run, read_checkpoint_agreed, restore_or_seed,
                     seed_everything, train, wrap_model)
from .loggers import format_metrics
from .visualize import save_reconstruction_grid

log = logging.getLogger("fcmae")

# Config keys that must match to continue a run from its checkpoint.
# encoder.dwconv picks a kernel for the same arithmetic: a run may resume with another
_RESUME_MUST_MATCH = ("model", "encoder.backend", "encoder.grn_stats", "data.img_size", "init_from")


class PretrainTask(Task):
    """FCMAE: masked reconstruction; reconstruction grids every ``vis_every`` steps."""

    def __init__(self, norm_pix: bool, mean, std, vis_every: int, image_every: int, evaluator=None, vis_bands=None):
        self.norm_pix, self.mean, self.std, self.vis_bands = norm_pix, tuple(mean), tuple(std), vis_bands
        self.vis_every, self.image_every = vis_every, image_every
        self.evaluator = evaluator
        self.last_batch = None

    def loss(self, model, batch, device):
        imgs, masks = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        # the count comes with the batch, checked by the data pipeline (data.collate_masked)
        loss, pred, mask = model(imgs, mask=masks, visible_per_sample=batch[4])
        self.last_batch = (imgs, pred.detach(), mask)
        return loss

    def visualize(self, loop: TrainLoop) -> None:
        if not loop.dist.is_main or self.last_batch is None:
            return
        imgs, pred, mask = self.last_batch
        step = loop.state.step
        path = loop.run_dir / "reconstructions" / f"step-{step:07d}.png"
        loop.write_output(lambda: save_reconstruction_grid(path, imgs, pred, mask, self.norm_pix, self.mean, self.std,
                                                           bands=self.vis_bands))
        if path.is_file() and (step % self.image_every == 0 or step >= loop.settings.stop_step):
            loop.write_output(lambda: loop.tracker.log_image("reconstruction", path, step))

    def after_step(self, loop):
        if loop.state.step % self.vis_every == 0 or loop.state.step >= loop.settings.stop_step:
            self.visualize(loop)

    def evaluate(self, loop, final):
        if self.evaluator is None or not self.evaluator.due(loop.state.epoch, final):
            return None
        return self.evaluator(loop.raw_model.encoder, loop.dist)



def build_model(cfg) -> FCMAE:
    m = cfg.model
    return FCMAE(depths=list(m.depths), dims=list(m.dims), decoder_depth=m.decoder_depth,
                 decoder_embed_dim=m.decoder_embed_dim, mask_ratio=m.mask_ratio, norm_pix_loss=m.norm_pix_loss,
                 drop_path_rate=m.drop_path_rate, backend=cfg.encoder.backend, grn_stats=cfg.encoder.grn_stats,
                 dwconv=cfg.encoder.dwconv, in_chans=m.in_chans)


def choose_dwconv(model: FCMAE, encoder_cfg, info: DistInfo, precision: str) -> str:
    """Settle ``encoder.dwconv`` before training (``sparse`` backend): ``auto`` runs the tile kernel's
    self-test on CUDA and falls back to the canvas with a warning that says why. Returns the kernel."""
    if encoder_cfg.backend != "sparse":
        return "n/a"
    from .sparse.dwconv_choice import resolve_dwconv
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    try:
        kernel, why = resolve_dwconv(encoder_cfg.dwconv, info.device, dtype, dims=tuple(model.encoder.dims))
    except RuntimeError as exc:
        raise ConfigError(str(exc)) from None
    if kernel == "canvas" and encoder_cfg.dwconv == "auto" and "self-test" in why:
        log.warning("encoder.dwconv=auto: using the canvas depthwise conv: %s", why)
    elif info.is_main:
        log.info("depthwise conv: %s (%s)", kernel, why)
    model.encoder.dwconv = kernel
    return kernel


def load_encoder_init(model: FCMAE, path: str, info: DistInfo | None = None) -> None:
    """Encoder weights from any layout the converter reads (rank 0 picks the file, every rank
    reads that one); the decoder stays fresh."""
    src, obj = read_checkpoint_agreed(path, info) if info is not None else read_checkpoint(path)
    canonical, layout = to_canonical(obj, source=str(src))
    canonical, adapted = adapt_stem(canonical, model.in_chans, f"init_from={path}")
    if adapted:
        log.warning("init_from=%s holds RGB weights; model.in_chans=%d: the stem starts from %s", path,
                    model.in_chans, adapted)
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
        if cfg.eval_only:
            return evaluate_run(cfg, run_dir, info)
        lock = RunLock(run_dir)  # taken by rank 0 in prepare_run, held until the run ends
        try:
            return _run(cfg, run_dir, info, list(callbacks), lock)
        finally:
            lock.release()
    finally:
        cleanup()


def evaluate_run(cfg, run_dir: Path, info: DistInfo) -> dict:
    """``eval_only=true``: score the run directory's newest whole checkpoint with ``eval=...``
    (the encoder, nothing masked), log the scores and append them to ``RUN_DIR/evals.jsonl``."""
    src, ck = read_checkpoint(run_dir)
    if auto_band_stats(cfg.data):  # the statistics the run trained with
        cfg.data.mean, cfg.data.std = ck["config"]["data"]["mean"], ck["config"]["data"]["std"]
    model = build_model(cfg)
    try:
        model.load_state_dict(ck["model"])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{src} does not hold this run's model ({str(exc)[:200]}); evaluate with the "
                              "overrides the run was trained with") from None
    evaluator = build_evaluator(cfg.eval, cfg.data, cfg.trainer.seed, info, cfg.model.in_chans)
    scores = evaluator(model.encoder.to(info.device), info)
    if info.is_main:
        record = {"step": ck["step"], "checkpoint": str(src), "eval": cfg.eval.name, **scores}
        append_line(run_dir / "evals.jsonl", json.dumps(record), "evaluation log")
        log.info("%s (step %d): %s; appended to %s", src, ck["step"], format_metrics(scores),
                 run_dir / "evals.jsonl")
    return scores


def resolve_band_stats(cfg, info: DistInfo) -> None:
    """``data.mean=auto``: rank 0 computes the per-band mean and std over ``data.stats_images`` images
    (a fixed draw for the seed, so a resumed run gets the same numbers), every rank takes them, and
    they replace ``auto`` in the config the checkpoints and exports carry."""
    stats = None
    if info.is_main:
        d = cfg.data
        channels = channels_of(d, cfg.model.in_chans)
        source = build_source(d, cfg.trainer.seed, channels)
        check_bands(source, channels)
        stats = band_stats(source, d.stats_images, cfg.trainer.seed, cfg.trainer.progress)
        log.info("data.mean=auto over %d images: data.mean=[%s] data.std=[%s] (pass these to skip the pass)",
                 min(d.stats_images, len(source)), ",".join(map(str, stats[0])), ",".join(map(str, stats[1])))
    mean, std = broadcast_object(stats, info)
    cfg.data.mean, cfg.data.std = mean, std


def _run(cfg, run_dir: Path, info: DistInfo, callbacks, lock: RunLock | None = None) -> LoopState:
    t = cfg.trainer
    setup = prepare_run(cfg, run_dir, info, lock)
    if auto_band_stats(cfg.data):
        resolve_band_stats(cfg, info)
    config = OmegaConf.to_container(cfg, resolve=True)  # saved in every checkpoint: the stats too

    # Data first: a bad data.root (or eval folder) fails before a model is built.
    loader, sampler, dataset = build_pretrain_loader(
        cfg.data, cfg.model.mask_ratio, t.seed, info.rank, info.world_size, pin_memory=info.device.type == "cuda",
        device=info.device, in_chans=cfg.model.in_chans)
    evaluator = build_evaluator(cfg.eval, cfg.data, t.seed, info, cfg.model.in_chans)
    s = loop_settings(cfg, len(sampler) // cfg.data.batch_size, setup.accum, setup.base_lr, setup.precision,
                      cfg.data.max_bad_fraction, callbacks)

    seed_everything(t.seed)
    model = build_model(cfg).to(info.device)
    choose_dwconv(model, cfg.encoder, info, setup.precision)
    if cfg.init_from and setup.resume_path is None:
        load_encoder_init(model, cfg.init_from, info)
    optimizer = adamw(param_groups(model, cfg.optim.weight_decay, cfg.optim.decay_grn_and_mask_token),
                      setup.base_lr, cfg.optim.betas, next(model.parameters()).is_cuda)
    state, scaler = restore_or_seed(setup, config, _RESUME_MUST_MATCH, model, optimizer, info, t.seed)
    train_model = wrap_model(model, t.compile, info)
    tracker = open_tracker(cfg, run_dir, config, info, setup.start_step)
    if info.is_main:
        log.info("run directory %s | %s, %d process(es) on %s, %s | effective batch %d (%d x %d x %d), "
                 "lr %.3e | %d steps/epoch, stopping at step %d of %d", run_dir, cfg.model.name,
                 info.world_size, info.device, setup.precision, setup.effective_batch, cfg.data.batch_size,
                 setup.accum, info.world_size, setup.base_lr, s.steps_per_epoch, s.stop_step, s.total_steps)

    task = PretrainTask(cfg.model.norm_pix_loss, cfg.data.mean, cfg.data.std, t.vis_every, cfg.logger.image_every, evaluator,
                        cfg.vis.bands)
    parts = RunParts(train_model, model, optimizer, scaler, loader, sampler, info, setup.ckpt, tracker, config, run_dir)
    final = train(task, parts, s, state)
    if info.is_main:
        log.info("done: step %d, checkpoint %s; export with: fcmae-export %s --format timm", final.step,
                 setup.ckpt.last, run_dir)
    return final


register_configs()


def main() -> None:
    hydra_entry(CONFIG_PATH, "pretrain", run)


if __name__ == "__main__":
    main()

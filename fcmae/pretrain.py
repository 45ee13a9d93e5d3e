"""``fcmae-pretrain``: the Hydra app. Builds every object from the config, in this one place.

    fcmae-pretrain                                   # ~1 min CPU demo on built-in synthetic images
    fcmae-pretrain trainer.max_steps=400             # the same run, made longer (the schedule stretches)
    fcmae-pretrain eval=knn eval_only=true           # score the finished run (RUN_DIR/evals.jsonl)
    fcmae-pretrain experiment=in1k_fcmae model=convnextv2_base data.root=/data/imagenet/train
    fcmae-pretrain -m model.mask_ratio=0.4,0.6,0.75  # a sweep, one run directory per value
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

import torch

from .config.resume_rules import PRETRAIN as RESUME_RULES
from .config import CONFIG_PATH, ConfigError, register_configs
from .storage.checkpoint_record import read_for_inspection
from .storage.files import append_line
from .storage.weights_file import CheckpointError
from .data import band_stats, build_pretrain_loader, build_source, channels_of, check_bands
from .data.image_io import auto_band_stats
from .distributed import DistInfo, broadcast_object
from .engine import LoopState, Task, TaskContext
from .evaluation import build_evaluator
from .models.fcmae import FCMAE
from .models.masking import image_shape, num_visible
from .optim import adamw, param_groups
from .run import RunData, hydra_entry, run_app
from .export.convert import DECODER_PREFIXES
from .run.init_weights import read_init_weights
from .run.memory_plan import (MemoryPlan, PeakCheck, emulated_cuda_autocast, fake_module, plan_step, trainable_bytes,
                              wants_plan)
from .run.settings import resolve_precision
from .run.validation import validate
from .loggers import format_metrics
from .visualize import save_reconstruction_grid

log = logging.getLogger("fcmae")



class PretrainTask(Task):
    """FCMAE: masked reconstruction; reconstruction grids every ``vis_every`` steps."""

    def __init__(self, norm_pix: bool, mean, std, vis_every: int, image_every: int, evaluator=None, vis_bands=None,
                 patch_size: int = 32):
        self.norm_pix, self.mean, self.std, self.vis_bands = norm_pix, tuple(mean), tuple(std), vis_bands
        self.patch_size = patch_size
        self.vis_every, self.image_every = vis_every, image_every
        self.evaluator = evaluator
        self.last_batch = None

    def loss(self, model, batch, device):
        imgs, masks = batch.images.to(device, non_blocking=True), batch.masks.to(device, non_blocking=True)
        # the count comes with the batch, checked by the data pipeline (data.collate_masked)
        loss, pred, mask = model(imgs, mask=masks, visible_per_sample=batch.visible_per_sample)
        self.last_batch = (imgs, pred.detach(), mask)
        return loss

    def visualize(self, run: TaskContext) -> None:
        if not run.dist.is_main or self.last_batch is None:
            return
        imgs, pred, mask = self.last_batch
        step = run.state.step
        path = run.run_dir / "reconstructions" / f"step-{step:07d}.png"
        run.write_output(lambda: save_reconstruction_grid(path, imgs, pred, mask, self.norm_pix, self.mean, self.std,
                                                           patch_size=self.patch_size, bands=self.vis_bands))
        if path.is_file() and (step % self.image_every == 0 or step >= run.settings.stop_step):
            run.write_output(lambda: run.tracker.log_image("reconstruction", path, step))

    def after_step(self, run: TaskContext) -> None:
        if run.state.step % self.vis_every == 0 or run.state.step >= run.settings.stop_step:
            self.visualize(run)

    def evaluate(self, run: TaskContext, final: bool) -> dict | None:
        if self.evaluator is None or not self.evaluator.due(run.state.epoch, final):
            return None
        return self.evaluator(run.raw_model.encoder, run.dist)



def build_model(cfg) -> FCMAE:
    m = cfg.model
    return FCMAE(depths=list(m.depths), dims=list(m.dims), decoder_depth=m.decoder_depth,
                 decoder_embed_dim=m.decoder_embed_dim, mask_ratio=m.mask_ratio, norm_pix_loss=m.norm_pix_loss,
                 drop_path_rate=m.drop_path_rate, backend=cfg.encoder.backend, grn_stats=cfg.encoder.grn_stats,
                 dwconv=cfg.encoder.dwconv, in_chans=m.in_chans, patch_size=m.patch_size)


def training_step_parts(cfg, device: torch.device, batch: int, checkpointing: str, dwconv=None, meta: bool = False):
    """What one pretraining step is made of, as ``cfg`` configures it, on ``device``: ``(model, make_optimizer,
    make_inputs, loss_of)``. ``meta``: the model built on the meta device (no memory, no init; for a trace).
    ``dwconv``: the depthwise conv the run chose (``cfg``'s otherwise; ``auto`` takes the canvas, the larger
    of the two in memory). Shared by the memory plan and its measurement, so both see the same step."""
    from .data.samples import MaskedBatch
    from .models.masking import check_image_size, random_mask
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = build_model(cfg)
    if not meta:
        model = model.to(device)
    if cfg.encoder.backend == "sparse":
        chosen = dwconv or cfg.encoder.dwconv
        model.encoder.dwconv = "canvas" if chosen == "auto" else chosen
    model.encoder.activation_checkpointing = checkpointing
    model.train()
    h, w = image_shape(cfg.data.img_size)
    grid = check_image_size(h, w, cfg.model.patch_size)
    keep = num_visible(grid[0] * grid[1], cfg.model.mask_ratio)
    task = PretrainTask(cfg.model.norm_pix_loss, [0.0], [1.0], 1, 1, patch_size=cfg.model.patch_size)

    def make_inputs():
        masks = random_mask(batch, grid[0] * grid[1], keep=keep, device=device)
        images = torch.empty(batch, cfg.model.in_chans, h, w, device=device).normal_()
        return MaskedBatch(images, masks, None, None, keep)

    def make_optimizer(m, cuda: bool = device.type == "cuda"):
        return adamw(param_groups(m, cfg.optim.weight_decay, cfg.optim.decay_grn_and_mask_token), 1e-4,
                     cfg.optim.betas, cuda)
    return model, make_optimizer, make_inputs, lambda m, b: task.loss(m, b, device)


def plan_memory(cfg, device: str = "cuda", batch: int | None = None, checkpointing: str | None = None,
                dwconv=None, processes: int = 1) -> MemoryPlan:
    """The memory plan of one pretraining step as ``cfg`` configures it (:mod:`fcmae.run.memory_plan`), for a
    run on ``device`` (its precision resolved as the run resolves it), at ``batch`` images a process (``cfg``'s
    by default) and ``checkpointing`` (``cfg``'s by default), one of ``processes`` (DDP's buckets with several).
    Traced on fake tensors: no memory used; a GPU target planned on a machine without one runs on fake CPU
    tensors under CUDA's autocast casts."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    if cfg.encoder.backend == "minkowski":
        raise ConfigError("the memory plan traces PyTorch's ops; encoder.backend=minkowski runs in MinkowskiEngine's "
                          "own memory: plan encoder.backend=sparse (the same encoder) instead")
    target = torch.device(device)
    precision = resolve_precision(cfg.trainer.precision, target)
    batch = batch or cfg.data.batch_size
    checkpointing = checkpointing or cfg.trainer.activation_checkpointing
    fake_device = target if target.type == "cpu" or torch.cuda.is_available() else torch.device("cpu")
    autocast = contextlib.nullcontext
    if precision != "fp32":
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        if fake_device.type == target.type:
            autocast = lambda: torch.autocast(target.type, dtype=dtype)  # noqa: E731
        else:
            autocast = emulated_cuda_autocast
    model, make_optimizer, make_inputs, loss_of = training_step_parts(cfg, fake_device, batch, checkpointing,
                                                                      dwconv, meta=True)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    model = fake_module(model, fake_mode, fake_device)
    plan = plan_step(model, lambda m: make_optimizer(m, target.type == "cuda"), make_inputs, loss_of, fake_mode,
                     autocast, clip=True, batch=batch, checkpointing=checkpointing)
    return plan.with_ddp_buckets(trainable_bytes(model)) if processes > 1 else plan


def choose_dwconv(model: FCMAE, cfg, info: DistInfo, precision: str, run_dir: Path | None = None,
                  measure=None) -> str | list[str]:
    """Settle ``encoder.dwconv`` before training (``sparse`` backend): ``auto`` runs the tile kernel's
    self-test on CUDA (falling back to the canvas with a warning that says why), then takes, stage by stage,
    the faster of the two at the run's batch shapes (``measure(path, stage) -> ms``; CUDA events by default),
    recorded in the run directory so a resume on the same GPU keeps the choice. Returns the kernel(s)."""
    encoder_cfg = cfg.encoder
    if encoder_cfg.backend != "sparse":
        return "n/a"
    from .sparse.dwconv_choice import auto_by_speed, cuda_timer, resolve_dwconv
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    dims = tuple(model.encoder.dims)
    try:
        kernel, why = resolve_dwconv(encoder_cfg.dwconv, info.device, dtype, dims=dims)
    except RuntimeError as exc:
        raise ConfigError(str(exc)) from None
    if kernel == "canvas" and encoder_cfg.dwconv == "auto" and "self-test" in why:
        log.warning("encoder.dwconv=auto: using the canvas depthwise conv: %s", why)
    elif kernel == "tiles" and encoder_cfg.dwconv == "auto":
        d = cfg.data
        device_name = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else str(info.device)
        key = {"device": device_name, "dtype": precision, "dims": list(dims), "batch": d.batch_size,
               "img_size": list(image_shape(d.img_size)), "mask_ratio": cfg.model.mask_ratio}
        measure = measure or cuda_timer(info.device, dtype, dims, d.batch_size, d.img_size, cfg.model.mask_ratio,
                                        patch_size=cfg.model.patch_size)
        kernel, how = auto_by_speed(run_dir, key, measure, len(dims), info.is_main)
        if info.is_main:
            log.info("depthwise conv by stage: %s (encoder.dwconv=auto: %s; encoder.dwconv=tiles|canvas forces one)",
                     ", ".join(kernel), how)
        if len(set(kernel)) == 1:
            kernel = kernel[0]
    elif info.is_main:
        log.info("depthwise conv: %s (%s)", kernel, why)
    model.encoder.dwconv = kernel
    return kernel


def load_encoder_init(model: FCMAE, path: str, info: DistInfo | None = None) -> None:
    """``init_from``: the encoder from any layout the converter reads; the decoder, its projection, the mask
    token and the prediction head too when the source has them (a run, its checkpoint, ``fcmae-export
    --format fcmae``) in this model's shapes, so that pretraining continues where the source stopped.
    An encoder-only source (timm or official release weights, an encoder export) starts a fresh decoder."""
    init = read_init_weights(path, "init_from", model.in_chans, info)
    missing, unexpected = model.encoder.load_state_dict(init.canonical, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"init_from={path}: encoder shape differs from model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]}); pick the matching model=")
    decoder = init.decoder
    own = {k: v for k, v in model.state_dict().items() if k.startswith(DECODER_PREFIXES)}
    if not decoder:
        log.info("initialised the encoder from %s (%s layout); fresh decoder (the source holds the encoder only)",
                 path, init.layout)
        return
    differs = sorted(k for k in own if k not in decoder or decoder[k].shape != own[k].shape)
    if differs or set(decoder) - set(own):
        log.warning("initialised the encoder from %s; fresh decoder: the source's decoder has other shapes (%s: "
                    "another model.decoder_embed_dim, decoder_depth or in_chans)", path,
                    ", ".join((differs or sorted(set(decoder) - set(own)))[:3]))
        return
    with torch.no_grad():
        for k, v in decoder.items():
            model.state_dict()[k].copy_(v)
    log.info("initialised the encoder, decoder and mask token from %s (full FCMAE weights): pretraining continues "
             "from the source model", path)


def evaluate_run(cfg, run_dir: Path, info: DistInfo) -> dict:
    """``eval_only=true``: score the run directory's newest whole checkpoint with ``eval=...``
    (the encoder, nothing masked), log the scores and append them to ``RUN_DIR/evals.jsonl``."""
    found = read_for_inspection(run_dir)
    src, record = found.source, found.record
    if record is None:
        raise CheckpointError(f"{src} is not a training checkpoint of ours; eval_only scores a pretraining run")
    if auto_band_stats(cfg.data):  # the statistics the run trained with
        cfg = OmegaConf.merge(cfg, {"data": {"mean": record.setting("data.mean"), "std": record.setting("data.std")}})
    model = build_model(cfg)
    try:
        model.load_state_dict(record.model)
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{src} does not hold this run's model ({str(exc)[:200]}); evaluate with the "
                              "overrides the run was trained with") from None
    evaluator = build_evaluator(cfg.eval, cfg.data, cfg.trainer.seed, info, cfg.model.in_chans)
    scores = evaluator(model.encoder.to(info.device), info)
    if info.is_main:
        line = {"step": record.step, "checkpoint": str(src), "eval": cfg.eval.name, **scores}
        append_line(run_dir / "evals.jsonl", json.dumps(line), "evaluation log")
        log.info("%s (step %d): %s; appended to %s", src, record.step, format_metrics(scores),
                 run_dir / "evals.jsonl")
    return scores


def resolve_band_stats(cfg, info: DistInfo):
    """``data.mean=auto``: rank 0 computes the per-band mean and std over ``data.stats_images`` images
    (a fixed draw for the seed, so a resumed run gets the same numbers), every rank takes them; returns
    the config with them in place of ``auto`` (what the checkpoints and exports carry)."""
    stats = None
    if info.is_main:
        d = cfg.data
        channels = channels_of(d, cfg.model.in_chans)
        source = build_source(d, cfg.trainer.seed, channels)
        check_bands(source, channels)
        stats = band_stats(source, d.stats_images, cfg.trainer.seed, cfg.trainer.progress)
        log.info("data.mean=auto over %d images: data.mean=[%s] data.std=[%s] (pass these to skip the pass in "
                 "later runs; to continue this one with them, add hydra.run.dir=<its directory>: data.mean names it)",
                 min(d.stats_images, len(source)), ",".join(map(str, stats[0])), ",".join(map(str, stats[1])))
    mean, std = broadcast_object(stats, info)
    return OmegaConf.merge(cfg, {"data": {"mean": list(mean), "std": list(std)}})


class PretrainApp:
    """``fcmae-pretrain`` for :func:`fcmae.run.run_app`: masked images in, an FCMAE model, AdamW over
    its decay groups, the reconstruction task."""

    resume_rules = RESUME_RULES  # what a resume does with each changed key (fcmae.config.resume_rules)

    def validate(self, cfg) -> None:
        validate(cfg)

    def evaluate_only(self, cfg, run_dir: Path, info: DistInfo) -> dict:
        return evaluate_run(cfg, run_dir, info)

    def build_data(self, cfg, info: DistInfo) -> RunData:
        if auto_band_stats(cfg.data):
            cfg = resolve_band_stats(cfg, info)
        loader, sampler, _ = build_pretrain_loader(
            cfg.data, cfg.model.mask_ratio, cfg.trainer.seed, info.rank, info.world_size,
            pin_memory=info.device.type == "cuda", device=info.device, in_chans=cfg.model.in_chans,
            patch_size=cfg.model.patch_size)
        evaluator = build_evaluator(cfg.eval, cfg.data, cfg.trainer.seed, info, cfg.model.in_chans)
        return RunData(cfg, loader, sampler, {"evaluator": evaluator})

    def build_model(self, cfg, data: RunData, info: DistInfo, precision: str, run_dir: Path | None = None) -> FCMAE:
        model = build_model(cfg).to(info.device)
        choose_dwconv(model, cfg, info, precision, run_dir)
        model.encoder.activation_checkpointing = cfg.trainer.activation_checkpointing
        return model

    def load_initial_weights(self, model: FCMAE, cfg, info: DistInfo) -> None:
        if cfg.init_from:
            load_encoder_init(model, cfg.init_from, info)

    def build_task(self, cfg, model: FCMAE, data: RunData) -> PretrainTask:
        return PretrainTask(cfg.model.norm_pix_loss, cfg.data.mean, cfg.data.std, cfg.trainer.vis_every,
                            cfg.logger.image_every, data.extras["evaluator"], cfg.vis.bands, cfg.model.patch_size)

    def memory_plan(self, cfg, model: FCMAE, info: DistInfo) -> PeakCheck | None:
        """``trainer.memory_plan``: the step's plan in the log before it runs; on a GPU, checked after the
        first steps against the allocator's peak (:class:`fcmae.run.memory_plan.PeakCheck`)."""
        if not wants_plan(cfg.trainer.memory_plan, info.device):
            return None
        dwconv = model.encoder.dwconv if cfg.encoder.backend == "sparse" else None
        try:
            plan = plan_memory(cfg, info.device.type, dwconv=dwconv, processes=info.world_size)
        except Exception as exc:  # noqa: BLE001 (a diagnostic: the run goes on without it, saying why)
            log.warning("memory plan: not made (%s: %s); trainer.memory_plan=off skips it", type(exc).__name__, exc)
            return None
        log.info("memory plan, per process: %s (fcmae-plan with the same overrides and --gib N gives the largest "
                 "batch for a GPU of N GiB)", plan.summary())
        return PeakCheck(plan, info.device, lambda line: log.info("%s", line)) if info.device.type == "cuda" else None

    def build_optimizer(self, cfg, model: FCMAE, lr: float):
        return adamw(param_groups(model, cfg.optim.weight_decay, cfg.optim.decay_grn_and_mask_token), lr,
                     cfg.optim.betas, next(model.parameters()).is_cuda)

    def describe(self, cfg, run_dir: Path, setup, s, info: DistInfo) -> str:
        return (f"run directory {run_dir} | {cfg.model.name}, {info.world_size} process(es) on {info.device}, "
                f"{setup.precision} | effective batch {setup.effective_batch} ({cfg.data.batch_size} x {setup.accum} x "
                f"{info.world_size}), lr {setup.base_lr:.3e} | {s.steps_per_epoch} steps/epoch, stopping at step "
                f"{s.stop_step} of {s.total_steps}")

    def summary(self, final: LoopState, setup, task, run_dir: Path) -> str:
        return f"done: step {final.step}, checkpoint {setup.ckpt.last}; export with: fcmae-export {run_dir} --format timm"


def run(cfg: DictConfig, run_dir: str | Path, callbacks=()) -> LoopState:
    """Pretrain as configured, in ``run_dir``; returns the final loop state (with ``eval_only=true``,
    the scores)."""
    return run_app(PretrainApp(), cfg, run_dir, callbacks)


register_configs()


def main() -> None:
    hydra_entry(CONFIG_PATH, "pretrain", run)


if __name__ == "__main__":
    main()

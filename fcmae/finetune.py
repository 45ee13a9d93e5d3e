"""``fcmae-finetune``: supervised fine-tuning of a dense ConvNeXt V2 classifier (timm's
``convnextv2_<size>``) from an FCMAE export or pretraining run, with the same loop,
checkpoints, resume, logging and DDP as pretraining.

    fcmae-finetune                                                   # CPU demo, synthetic classes
    fcmae-finetune model.init_from=outputs/convnextv2_atto-synthetic/data.img_size:64  # from a run
    fcmae-finetune experiment=ft_base model.init_from=base.safetensors \\
        data.source=imagefolder data.train_root=/data/in1k/train data.val_root=/data/in1k/val
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from .storage.checkpoint_record import BEST_SCORES, CLASS_NAMES, EMA_WEIGHTS, read_for_inspection
from .config.resume_rules import FINETUNE as RESUME_RULES
from .config import CONFIG_PATH, ROOTED_LABELLED, ConfigError, register_configs
from .export.convert import canonical_to_format, infer_shape, stem_of, variant_of
from .models.masking import image_shape, stem_stride
from .models.timm_convnextv2 import timm_convnextv2
from .storage.weights_file import CheckpointError
from .data import (EvalImages, LabelledSamples, build_eval_loader, build_train_loader, channels_of, check_bands,
                   class_names_of, eval_transform, finetune_transform, labelled_source, num_classes_of)
from .data.image_io import auto_band_stats
from .data.stats import band_stats
from .distributed import DistInfo, all_reduce_sum, broadcast_object
from .export.hf import IMAGENET_MEAN, IMAGENET_STD
from .engine import LoopState, Task, TaskContext
from .evaluation import inference
from .loggers import track
from .optim import adamw, layer_decay_groups
from .run import RunData, hydra_entry, run_app
from .run.init_weights import read_init_weights, read_input_normalisation
from .run.validation import validate_finetune

log = logging.getLogger("fcmae")



def build_classifier(name: str, num_classes: int, drop_path_rate: float, head_init_scale: float,
                     in_chans: int = 3, patch_size: int = 32) -> nn.Module:
    """timm's ``name`` with a stem of stride ``patch_size / 8`` (timm's ``patch_size``: 4 for 32-pixel
    mask patches, 2 or 1 for a model pretrained on 16 or 8; :func:`fcmae.models.timm_convnextv2.timm_convnextv2`)."""
    return timm_convnextv2(name, stem_stride(patch_size), num_classes=num_classes, drop_path_rate=drop_path_rate,
                           head_init_scale=head_init_scale, in_chans=in_chans)


def resolve_patch_size(cfg, init=None) -> int:
    """``model.patch_size``, or where null the one ``model.init_from`` was pretrained with (8 x its stem's
    stride; ``init``: its weights as read), or 32; a given one that disagrees with them is refused, naming
    both."""
    given = cfg.model.patch_size
    if given is not None:
        stem_stride(given)  # a clear error for a patch that is no multiple of 8
    if init is None:
        return given or 32
    found = 8 * stem_of(init.canonical)
    if given is not None and given != found:
        raise ConfigError(f"model.patch_size={given} but model.init_from={init.source} was pretrained with "
                          f"{found}-pixel patches (a stem of stride {found // 8}); set model.patch_size={found} "
                          "or leave it null")
    return found


def set_activation_checkpointing(model: nn.Module, how: str) -> None:
    """``trainer.activation_checkpointing`` on timm's ConvNeXt V2: ``block`` is timm's own (each block's
    activations recomputed in the backward), ``stage`` recomputes each stage's blocks as one; ``off``."""
    if how == "block":
        model.set_grad_checkpointing(True)
    elif how == "stage":
        from torch.utils.checkpoint import checkpoint

        def forward(stage, x):
            x = stage.downsample(x)
            if torch.is_grad_enabled():
                return checkpoint(stage.blocks, x, use_reentrant=False, preserve_rng_state=True)
            return stage.blocks(x)
        for stage in model.stages:
            stage.forward = forward.__get__(stage)


def load_pretrained(model: nn.Module, name: str, path: str | Path, info: DistInfo | None = None,
                    init=None) -> str:
    """Encoder weights from an export file, a pretraining checkpoint or a run directory
    (any layout the converter reads; rank 0 picks the file, every rank reads that one); the
    classifier head stays freshly initialised. ``init``: the weights already read from ``path``."""
    if init is None:
        init = read_init_weights(path, "model.init_from", model.stem[0].in_channels, info)
    src, canonical, layout = init.source, init.canonical, init.layout
    found = variant_of(canonical)
    found_name = f"convnextv2_{found.name}" if found else f"depths/dims {infer_shape(canonical)}"
    if found_name != name:
        raise CheckpointError(f"model.init_from={src} holds {found_name} weights but model.name={name}; "
                              f"set model.name={found_name}")
    sd = {k: v for k, v in canonical_to_format(canonical, "timm").items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise CheckpointError(f"{src}: keys do not fit {name} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    log.info("initialised %s from %s (%s layout); fresh head", name, src, layout)
    return layout


def build_optimizer(model: nn.Module, optim_cfg, lr: float) -> torch.optim.Optimizer:
    """AdamW over the official layer-decay groups (``optim.layer_decay_type`` single | group)."""
    depths = [len(stage.blocks) for stage in model.stages]
    groups = layer_decay_groups(model, optim_cfg.weight_decay, optim_cfg.layer_decay, optim_cfg.layer_decay_type,
                                depths)
    return adamw(groups, lr, optim_cfg.betas, next(model.parameters()).is_cuda)


def evaluate_classifier(model: nn.Module, loader, device: torch.device, info: DistInfo, prefix: str = "val") -> dict:
    """Top-1/top-5 (%) and mean cross-entropy over the validation set (all ranks' shards)."""
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, loss, count
    with inference(model, device):
        for imgs, y, ok in track(loader, len(loader), f"evaluating {prefix}", enabled=info.is_main):
            imgs, y = imgs[ok].to(device, non_blocking=True), y[ok].to(device)
            if y.numel() == 0:
                continue
            logits = model(imgs).float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            sums += torch.stack([(top[:, 0] == y).sum(), (top == y[:, None]).any(1).sum(),
                                 F.cross_entropy(logits, y, reduction="sum"), torch.tensor(y.numel(), device=device)
                                 ]).double()
    top1, top5, loss, n = all_reduce_sum(sums, info).tolist()  # the one host sync
    n = max(n, 1.0)
    return {f"{prefix}/top1": 100 * top1 / n, f"{prefix}/top5": 100 * top5 / n, f"{prefix}/loss": loss / n,
            f"{prefix}/images": int(n)}


class ClassifyTask(Task):
    """Cross-entropy with label smoothing, or soft targets under mixup/cutmix (timm's Mixup);
    an EMA of the weights (timm's ``ModelEmaV2``, updated after every optimizer step) when
    ``ema.enabled``. Each evaluation keeps ``best.pt`` (best val top-1 of the raw weights) and,
    with ``ema.eval``, ``best-ema.pt`` (best of the EMA weights), as the official code does."""

    def __init__(self, num_classes: int, mixup_cfg, val_loader, eval_every: int, ema=None, ema_eval: bool = False,
                 class_names=None):
        self.class_names = list(class_names) if class_names else None  # saved: eval_only matches by name
        self.mixup = None
        if mixup_cfg.mixup > 0 or mixup_cfg.cutmix > 0:
            from timm.data import Mixup
            self.mixup = Mixup(mixup_alpha=mixup_cfg.mixup, cutmix_alpha=mixup_cfg.cutmix, prob=mixup_cfg.prob,
                               switch_prob=mixup_cfg.switch_prob, label_smoothing=mixup_cfg.label_smoothing,
                               num_classes=num_classes)
        self.smoothing = mixup_cfg.label_smoothing
        self.val_loader, self.eval_every = val_loader, eval_every
        self.ema, self.ema_eval = ema, ema_eval and ema is not None
        self.best = {"val/best_top1": None, "val_ema/best_top1": None}

    def loss(self, model, batch, device):
        imgs, y = batch.images.to(device, non_blocking=True), batch.labels.to(device, non_blocking=True)
        if self.mixup is not None:
            imgs, soft = self.mixup(imgs, y)
            return torch.sum(-soft * F.log_softmax(model(imgs).float(), dim=-1), dim=-1).mean()
        return F.cross_entropy(model(imgs).float(), y, label_smoothing=self.smoothing)

    def after_step(self, run: TaskContext) -> None:
        if self.ema is not None:
            self.ema.update(run.raw_model)

    def evaluate(self, run: TaskContext, final: bool) -> dict | None:
        if not (final or run.state.epoch % self.eval_every == 0):
            return None
        out = {}
        runs = [("val", run.raw_model, "best.pt")]
        if self.ema_eval:
            runs.append(("val_ema", self.ema.module, "best-ema.pt"))
        for prefix, model, best_file in runs:
            metrics = evaluate_classifier(model, self.val_loader, run.dist.device, run.dist, prefix)
            best_key = f"{prefix}/best_top1"
            improved = self.best[best_key] is None or metrics[f"{prefix}/top1"] > self.best[best_key]
            if improved:
                self.best[best_key] = metrics[f"{prefix}/top1"]
            out.update(metrics)
            out[best_key] = self.best[best_key]
            if improved:  # every rank saw the same all-reduced metrics: all take part in the save
                run.save(best_file)
        return out

    def state_dict(self) -> dict:
        out = {BEST_SCORES: dict(self.best)}
        if self.class_names:
            out[CLASS_NAMES] = self.class_names
        if self.ema is not None:
            out[EMA_WEIGHTS] = self.ema.module.state_dict()
        return out

    def load_state_dict(self, entries: dict) -> None:
        self.best.update(entries.get(BEST_SCORES, {}))
        if self.ema is not None:
            if EMA_WEIGHTS not in entries:
                raise ConfigError("the checkpoint holds no EMA weights but ema.enabled=true; continue with "
                                  "ema.enabled=false, or start another run (run_name=...)")
            self.ema.module.load_state_dict(entries[EMA_WEIGHTS])


def build_val_loader(cfg, info: DistInfo, seed: int, class_names=None):
    """``(val source, loader)``: the official evaluation transform over this rank's shard;
    ``class_names`` (the training set's) match an image folder's labels by name."""
    d = cfg.data
    val_src = labelled_source(d.source, d.val_root, "val", d.synthetic_val_images, d.synthetic_classes,
                              d.img_size, seed, d.val_per_class, 0, class_names=class_names,
                              channels=channels_of(d, cfg.model.in_chans))
    transform = eval_transform(d.img_size, d.crop_pct, d.mean, d.std)
    return val_src, build_eval_loader(EvalImages(val_src, transform, d.img_size, cfg.model.in_chans), d.batch_size,
                                      d.num_workers,
                                      info.rank, info.world_size)


def evaluate_only(cfg, info: DistInfo) -> dict:
    """Top-1/top-5 of a fine-tuned classifier (``model.init_from``: a checkpoint or run
    directory; its EMA weights too when it has them) on the validation set."""
    if not cfg.model.init_from:
        raise ConfigError("eval_only=true needs model.init_from=RUN_DIR_OR_CHECKPOINT (a fine-tuned classifier)")
    found = read_for_inspection(cfg.model.init_from)
    src, record = found.source, found.record
    if cfg.data.mean is None or cfg.data.std is None or auto_band_stats(cfg.data):  # the run's own
        own = record is not None and record.setting("data.mean") not in (None, "auto")
        cfg = OmegaConf.merge(cfg, {"data": {"mean": list(record.setting("data.mean") if own else IMAGENET_MEAN),
                                             "std": list(record.setting("data.std") if own else IMAGENET_STD)}})
    weights = {"val": record.model if record is not None else found.other}
    if record is not None and record.ema_weights is not None:
        weights["val_ema"] = record.ema_weights
    head = weights["val"].get("head.fc.weight")
    if head is None:
        raise CheckpointError(f"{src} holds no classifier head (an fcmae-export file or a pretraining checkpoint?); "
                              "eval_only needs a fcmae-finetune checkpoint or run directory")
    class_names = record.class_names if record is not None else None
    if cfg.data.source in ROOTED_LABELLED and not class_names:
        log.warning("%s does not name its classes (an older checkpoint): val folders are matched to its "
                    "outputs by sorted position", src)
    val_src, val_loader = build_val_loader(cfg, info, cfg.trainer.seed, class_names)
    num_classes = head.shape[0]
    if num_classes_of(val_src) > num_classes:
        raise ConfigError(f"the validation set has {num_classes_of(val_src)} classes, {src} classifies {num_classes}")
    out = {}
    for prefix, sd in weights.items():
        model = build_classifier(cfg.model.name, num_classes, 0.0, 1.0, cfg.model.in_chans, 8 * stem_of(sd))
        try:
            model.load_state_dict(sd)
        except RuntimeError as exc:
            raise CheckpointError(f"{src} does not fit {cfg.model.name} ({str(exc)[:300]}); set model.name") from None
        out.update(evaluate_classifier(model.to(info.device), val_loader, info.device, info, prefix))
    if info.is_main:
        log.info("%s on %d images: %s", src, out["val/images"],
                 "  ".join(f"{k} {v:.2f}" for k, v in out.items() if not k.endswith("/images")))
    return out


STATS_IMAGES = 1000  # data.mean=auto: a seeded draw of this many training images, as pretraining's default


def resolve_normalisation(cfg, train_src, info: DistInfo):
    """``data.mean/std`` for fine-tuning: as given; ``auto``: computed over the training images (rank 0,
    shared); null: what ``model.init_from`` records (the pretraining run's, in its units), else ImageNet's
    for 3 bands. Returns the config with the numbers in place (what checkpoints carry)."""
    d, m = cfg.data, cfg.model
    if auto_band_stats(d):
        images = min(STATS_IMAGES, len(train_src))
        stats = band_stats(train_src, images, cfg.trainer.seed, cfg.trainer.progress) if info.is_main else None
        mean, std = broadcast_object(stats, info)
        how = f"computed over {images} training images (data.mean=auto)"
    elif d.mean is None or d.std is None:
        described = read_input_normalisation(m.init_from, m.in_chans) if m.init_from else None
        if described:
            mean, std = described["mean"], described["std"]
            how = f"from model.init_from={m.init_from} (pixels: {described.get('scaling', 'not recorded')})"
        elif m.in_chans == 3:
            mean, std, how = IMAGENET_MEAN, IMAGENET_STD, "ImageNet's (model.init_from records none)"
        else:
            raise ConfigError(f"data.mean/std: model.init_from records no normalisation for {m.in_chans} bands; "
                              "pass data.mean=[...] data.std=[...] (fcmae-stats prints them) or data.mean=auto")
    else:
        return cfg
    if info.is_main:
        log.info("data.mean=[%s] data.std=[%s]: %s", ",".join(f"{v:.4g}" for v in mean),
                 ",".join(f"{v:.4g}" for v in std), how)
    return OmegaConf.merge(cfg, {"data": {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}})


class FinetuneApp:
    """``fcmae-finetune`` for :func:`fcmae.run.run_app`: labelled images, timm's dense ConvNeXt V2
    classifier, AdamW over the official layer-decay groups, cross-entropy with mixup and EMA."""

    resume_rules = RESUME_RULES  # what a resume does with each changed key (fcmae.config.resume_rules)

    def validate(self, cfg) -> None:
        validate_finetune(cfg)

    def evaluate_only(self, cfg, run_dir: Path, info: DistInfo) -> dict:
        return evaluate_only(cfg, info)

    def build_data(self, cfg, info: DistInfo) -> RunData:
        """Train and val sources first (bad folders fail before a model is built); the class count
        comes from the training set unless ``model.num_classes`` says it."""
        t, d = cfg.trainer, cfg.data
        channels = channels_of(d, cfg.model.in_chans)
        train_src = labelled_source(d.source, d.train_root, "train", d.synthetic_images, d.synthetic_classes,
                                    d.img_size, t.seed, d.labels_per_class, d.labels_seed, channels=channels)
        check_bands(train_src, channels, "data.train_root")
        cfg = resolve_normalisation(cfg, train_src, info)
        d = cfg.data
        class_names = class_names_of(train_src)
        val_src, val_loader = build_val_loader(cfg, info, t.seed, class_names)
        num_classes = cfg.model.num_classes or num_classes_of(train_src)
        if num_classes_of(val_src) > num_classes:
            raise ConfigError(f"the validation set has {num_classes_of(val_src)} classes, the model {num_classes}; "
                              "point data.val_root at the same class folders as data.train_root")
        # read once: the patch comes from its stem, and load_initial_weights loads these same weights
        self.init = read_init_weights(cfg.model.init_from, "model.init_from", cfg.model.in_chans, info) \
            if cfg.model.init_from else None
        patch = resolve_patch_size(cfg, self.init)
        if any(side % patch for side in image_shape(d.img_size)):
            raise ConfigError(f"data.img_size={d.img_size} is not a multiple of the model's {patch}-pixel patches "
                              f"(model.patch_size, or model.init_from's); use e.g. data.img_size={7 * patch}")
        cfg = OmegaConf.merge(cfg, {"model": {"num_classes": num_classes, "patch_size": patch}})
        train_set = LabelledSamples(train_src, finetune_transform(d), t.seed)
        train_set.patch_size = patch
        loader, sampler = build_train_loader(train_set, d.batch_size, d.num_workers, t.seed, info.rank,
                                             info.world_size, info.device.type == "cuda" and d.pin_memory,
                                             d.persistent_workers)
        return RunData(cfg, loader, sampler, {"val_loader": val_loader, "class_names": class_names})

    def build_model(self, cfg, data: RunData, info: DistInfo, precision: str, run_dir: Path | None = None) -> nn.Module:
        m = cfg.model
        model = build_classifier(m.name, m.num_classes, m.drop_path_rate, m.head_init_scale, m.in_chans,
                                 m.patch_size or 32)
        set_activation_checkpointing(model, cfg.trainer.activation_checkpointing)
        return model.to(info.device)

    def load_initial_weights(self, model: nn.Module, cfg, info: DistInfo) -> None:
        if cfg.model.init_from:
            load_pretrained(model, cfg.model.name, cfg.model.init_from, info, getattr(self, "init", None))
        else:
            log.info("no model.init_from: training %s from random initialisation", cfg.model.name)

    def build_task(self, cfg, model: nn.Module, data: RunData) -> "ClassifyTask":
        self.init = None  # a resume does not load them: not kept for the run's length
        # As the official code: the EMA starts from the initial weights, on the model's device, before DDP.
        ema = None
        if cfg.ema.enabled:
            from timm.utils import ModelEmaV2
            ema = ModelEmaV2(model, decay=cfg.ema.decay)
        return ClassifyTask(cfg.model.num_classes, cfg.mixup, data.extras["val_loader"], cfg.eval_every, ema,
                            cfg.ema.eval, data.extras["class_names"])

    def build_optimizer(self, cfg, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return build_optimizer(model, cfg.optim, lr)

    def describe(self, cfg, run_dir: Path, setup, s, info: DistInfo) -> str:
        ema = cfg.ema.decay if cfg.ema.enabled else "off"
        return (f"run directory {run_dir} | {cfg.model.name}, {cfg.model.num_classes} classes, {info.world_size} "
                f"process(es) on {info.device}, {setup.precision} | effective batch {setup.effective_batch}, lr "
                f"{setup.base_lr:.3e}, layer decay {cfg.optim.layer_decay:g} ({cfg.optim.layer_decay_type}), EMA {ema} "
                f"| {s.steps_per_epoch} steps/epoch, stopping at step {s.stop_step} of {s.total_steps}")

    def summary(self, final: LoopState, setup, task: "ClassifyTask", run_dir: Path) -> str:
        best = "  ".join(f"{k} {v:.2f}%" for k, v in task.best.items() if v is not None) or "n/a"
        return (f"done: step {final.step}, {best}; checkpoints {setup.ckpt.last} and best.pt beside it (timm state "
                "dict under 'model')")


def run(cfg: DictConfig, run_dir: str | Path, callbacks=()):
    """Fine-tune as configured, in ``run_dir``; returns the final loop state. With
    ``eval_only=true``, evaluates ``model.init_from`` instead and returns its metrics."""
    return run_app(FinetuneApp(), cfg, run_dir, callbacks)


register_configs()


def main() -> None:
    hydra_entry(CONFIG_PATH, "finetune", run)


if __name__ == "__main__":
    main()

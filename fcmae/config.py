"""Structured configs for ``fcmae-pretrain`` and ``fcmae-finetune``: the schemas Hydra
type-checks, plus range checks.

The YAML files in ``conf/`` fill these dataclasses; a misspelled key or a wrong
type fails at start with Hydra's own message, and :func:`validate` checks ranges
before any data is read or any model is built.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from .models.variants import VARIANTS
from .optim import LAYER_DECAY_TYPES
from .sparse import BACKENDS, DWCONV, GRN_STATS
from .errors import UserError

# conf/ of a source checkout; an installed wheel carries it as the package fcmae.conf.
_SOURCE_CONF = Path(__file__).resolve().parents[1] / "conf"
CONFIG_PATH = str(_SOURCE_CONF) if _SOURCE_CONF.is_dir() else "pkg://fcmae.conf"

COMPILE_CHOICES = ("auto", "true", "false")
DECODE_CHOICES = ("auto", "cpu", "gpu")
LOGGERS = ("none", "wandb", "tensorboard", "wandb+tensorboard")
PRETRAIN_SOURCES = ("synthetic", "imagefolder", "folder", "filelist", "shards", "fashion_mnist")
LABELLED_SOURCES = ("synthetic", "imagefolder", "filelist", "shards", "fashion_mnist")
ROOTED_LABELLED = ("imagefolder", "filelist", "shards")  # need train_root / val_root


@dataclass
class ModelConfig:
    name: str = "convnextv2_atto"
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    dims: list[int] = field(default_factory=lambda: [40, 80, 160, 320])
    decoder_depth: int = 1
    decoder_embed_dim: int = 512
    mask_ratio: float = 0.6
    norm_pix_loss: bool = True
    drop_path_rate: float = 0.0
    in_chans: int = 3  # input bands: 3 for RGB, 1 for data.channels=grey, N for data.channels=all


@dataclass
class EncoderConfig:
    backend: str = "sparse"  # sparse | dense | minkowski
    grn_stats: str = "sample"  # sample | batch (the official MinkowskiGRN)
    dwconv: str = "auto"  # the sparse backend's depthwise conv: auto (tiles on CUDA with Triton) | canvas | tiles


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | imagefolder | folder | filelist | shards | fashion_mnist
    # a directory, the list file for filelist, the packed folder (or URL) for shards; fashion_mnist: null = Debian's
    root: Optional[str] = None
    img_size: int = 224
    batch_size: int = 16  # per GPU / per process
    num_workers: int = 2
    pin_memory: bool = True
    persistent_workers: bool = True
    synthetic_images: int = 2048
    synthetic_classes: int = 8
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    hflip: bool = True
    # one value per band (model.in_chans), in the units the data is read in (integers / their type's max);
    # mean=auto: computed at start over data.stats_images images (fcmae-stats SOURCE prints them)
    mean: Any = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: Any = field(default_factory=lambda: [0.229, 0.224, 0.225])
    stats_images: int = 1000
    # how a file becomes the input: rgb (8-bit RGB) | grey (one band) | all (every band of the file, in order)
    channels: str = "rgb"
    bands: Optional[list[int]] = None  # with channels=all: keep these bands, in this order
    npy_layout: str = "hwc"  # .npy arrays: hwc (H, W, C) | chw (C, H, W)
    max_bad_fraction: float = 0.01  # unreadable images tolerated before the run fails
    # where JPEGs are decoded and augmented: cpu (loader workers) | gpu (the training device, batched;
    # workers only read bytes) | auto (gpu when training on CUDA from image files)
    decode: str = "auto"


@dataclass
class OptimConfig:
    name: str = "adamw"
    blr: float = 1.5e-4  # lr = blr * effective_batch / 256 unless lr is set
    lr: Optional[float] = None
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    effective_batch_size: Optional[int] = None  # sets the accumulation when given
    clip_grad: Optional[float] = None


@dataclass
class PretrainOptimConfig(OptimConfig):
    # The official pretraining (timm 0.3.2 add_weight_decay) skips decay only for 1-D
    # parameters and biases, so GRN gamma/beta and the mask token are decayed. false also
    # skips them (the rule of the official fine-tuning code).
    decay_grn_and_mask_token: bool = True


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    warmup_epochs: float = 40.0
    warmup_steps: Optional[int] = None  # overrides warmup_epochs when set


@dataclass
class TrainerConfig:
    epochs: int = 800
    max_steps: Optional[int] = None  # stop after this many optimizer steps (schedule keeps epochs)
    accum_iter: int = 1
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda
    compile: str = "auto"  # auto (torch.compile on CUDA, eager on CPU) | true | false
    seed: int = 0
    log_every: int = 10
    vis_every: int = 500  # reconstruction grid every N steps (and at the end)
    ckpt_every: int = 500  # checkpoint every N optimizer steps (and each epoch end, and at the end)
    keep_checkpoints: int = 2
    progress: str = "auto"  # auto (bar on a TTY) | bar | log


@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb | tensorboard | wandb+tensorboard
    mode: str = "auto"  # auto (online with an API key, else offline) | online | offline | disabled
    project: str = "fcmae"
    entity: Optional[str] = None
    run_name: Optional[str] = None  # defaults to the top-level run_name
    tags: list[str] = field(default_factory=list)
    image_every: int = 500


@dataclass
class LauncherConfig:
    name: str = "local"  # local | slurm
    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int = 8
    cpus_per_task: int = 10
    mem_gb: int = 480
    timeout_min: int = 4320
    partition: Optional[str] = None
    account: Optional[str] = None
    max_num_timeout: int = 20  # requeues on reaching the time limit (preemptions are not counted)
    signal_delay_s: int = 120  # Slurm's warning signal (USR2) this long before the time limit


@dataclass
class EvalConfig:
    """Representation quality during pretraining: pooled encoder features (nothing masked)
    of a labelled train/val pair, scored by k-NN and/or a linear probe."""
    name: str = "none"  # none | knn | linear | knn+linear
    source: str = "synthetic"  # synthetic | imagefolder | fashion_mnist (train split vs test split)
    train_root: Optional[str] = None
    val_root: Optional[str] = None
    labels_per_class: Optional[int] = None  # a fixed class-balanced subset of the train set; null = all
    val_per_class: Optional[int] = None  # likewise for the val set
    synthetic_train_images: int = 512
    synthetic_val_images: int = 256
    img_size: Optional[int] = None  # defaults to data.img_size
    crop_pct: float = 0.875
    batch_size: int = 64
    num_workers: int = 2
    every_epochs: int = 1  # and always at the end of the run
    k: int = 20
    temperature: float = 0.07
    linear_steps: int = 300  # full-batch AdamW steps of the linear probe
    linear_lr: float = 1.0e-2
    linear_weight_decay: float = 1.0e-4


@dataclass
class VisConfig:
    bands: Optional[list[int]] = None  # the bands shown as red, green, blue (N-band data; default: the first three)


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: PretrainOptimConfig = field(default_factory=PretrainOptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    vis: VisConfig = field(default_factory=VisConfig)
    run_name: str = MISSING
    resume: str = "auto"  # auto (continue the run directory's last checkpoint) | never | PATH
    init_from: Optional[str] = None  # encoder weights (any converter layout), fresh decoder
    eval_only: bool = False  # score the run directory's newest checkpoint with eval=..., no training


# ---------------------------------------------------------------- fine-tuning

@dataclass
class ClassifierConfig:
    name: str = "convnextv2_atto"  # timm's convnextv2_<size>
    num_classes: Optional[int] = None  # from the data when null
    drop_path_rate: float = 0.1
    head_init_scale: float = 0.001
    in_chans: int = 3  # input bands (see data.channels); an RGB init_from is adapted to them
    init_from: Optional[str] = None  # fcmae-export file, pretraining checkpoint or run dir; null = random init


@dataclass
class FinetuneDataConfig:
    source: str = "synthetic"  # synthetic | imagefolder | filelist | fashion_mnist
    # imagefolder: root/<class>/<image>; filelist: a text file of 'path class_name' lines;
    # fashion_mnist: the IDX folder, null = Debian's
    train_root: Optional[str] = None
    val_root: Optional[str] = None
    labels_per_class: Optional[int] = None  # low-label fine-tuning: this many train images per class
    labels_seed: int = 0  # which images: a fixed draw for this seed
    val_per_class: Optional[int] = None  # validate on this many images per class (fixed draw); null = all
    img_size: int = 224
    batch_size: int = 32  # per GPU / per process
    num_workers: int = 2
    pin_memory: bool = True
    persistent_workers: bool = True
    synthetic_images: int = 1024
    synthetic_val_images: int = 256
    synthetic_classes: int = 8
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    hflip: bool = True
    # The official training transform (timm create_transform), official defaults:
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"  # RandAugment policy; null = none
    color_jitter: Optional[float] = None  # used only without auto_augment (official default: none)
    interpolation: str = "bicubic"
    re_prob: float = 0.25  # random erasing probability
    re_mode: str = "pixel"  # const | rand | pixel
    re_count: int = 1
    crop_pct: float = 0.875  # evaluation: resize to img_size / crop_pct, centre crop (plain resize at >= 384)
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    channels: str = "rgb"  # rgb | grey | all (as pretraining's data.channels)
    bands: Optional[list[int]] = None
    npy_layout: str = "hwc"
    max_bad_fraction: float = 0.01


@dataclass
class FinetuneOptimConfig(OptimConfig):
    blr: float = 6.25e-4
    min_lr: float = 1.0e-6  # as the official main_finetune.py
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    layer_decay: float = 1.0  # lr scale per layer from the head down (1.0 = off)
    layer_decay_type: str = "single"  # single (a level per block: atto-tiny) | group (3 blocks a level: base+)


@dataclass
class MixupConfig:
    mixup: float = 0.0  # Beta(alpha, alpha) mixup; 0 = off
    cutmix: float = 0.0  # Beta(alpha, alpha) cutmix; 0 = off
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1


@dataclass
class EmaConfig:
    """An exponential moving average of the weights (timm ``ModelEmaV2``), as the official
    ``--model_ema``/``--model_ema_decay``/``--model_ema_eval``."""
    enabled: bool = False
    decay: float = 0.9999
    eval: bool = False  # also evaluate the EMA weights each time (val_ema/*) and keep best-ema.pt


@dataclass
class FinetuneConfig:
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    run_name: str = MISSING
    resume: str = "auto"
    eval_every: int = 1  # validate every N epochs (and at the end)
    eval_only: bool = False  # evaluate model.init_from (a fine-tuned checkpoint) on the val set, no training


# What a run directory's name holds. Every key that changes the trained weights names it (through
# run_name or Hydra's override_dirname); the keys below do not, so the same command with one of them
# changed continues the same run. conf/<app>.yaml's hydra exclude_keys must list exactly these plus
# the config groups (tests/test_run_names.py walks the schemas: a new key must be classified here).
UNTRAINED_KEYS = frozenset({
    # where and how often things are written, logged, launched, evaluated; how data is fed
    "trainer.max_steps", "trainer.device", "trainer.compile", "trainer.progress", "trainer.log_every",
    "trainer.vis_every", "trainer.ckpt_every", "trainer.keep_checkpoints", "data.num_workers", "data.pin_memory",
    "data.persistent_workers", "data.max_bad_fraction", "resume", "run_name", "eval_only",
    "logger.name", "logger.mode", "logger.project", "logger.entity", "logger.run_name", "logger.tags",
    "logger.image_every", "launcher.name", "launcher.partition", "launcher.account", "launcher.nodes",
    "launcher.gpus_per_node", "launcher.tasks_per_node", "launcher.cpus_per_task", "launcher.mem_gb",
    "launcher.timeout_min", "launcher.max_num_timeout", "launcher.signal_delay_s",
})
PRETRAIN_UNTRAINED_KEYS = UNTRAINED_KEYS | {
    "data.decode", "encoder.dwconv",  # the same arithmetic, another pipeline or kernel
    "vis.bands",
    "eval.name", "eval.source", "eval.train_root", "eval.val_root", "eval.labels_per_class", "eval.val_per_class",
    "eval.synthetic_train_images", "eval.synthetic_val_images", "eval.img_size", "eval.crop_pct", "eval.batch_size",
    "eval.num_workers", "eval.every_epochs", "eval.k", "eval.temperature", "eval.linear_steps", "eval.linear_lr",
    "eval.linear_weight_decay",
}
FINETUNE_UNTRAINED_KEYS = UNTRAINED_KEYS | {"eval_every"}
# Paths: they change what is trained but do not read well in a name. The init is named by its tag in
# run_name (from-<run or file>); the data folders are not named (another dataset: set run_name).
PRETRAIN_PATH_KEYS = frozenset({"init_from", "data.root"})
FINETUNE_PATH_KEYS = frozenset({"model.init_from", "data.train_root", "data.val_root"})

MAX_DIRNAME = 200  # file systems refuse path components over 255 bytes
# Characters a directory name keeps; everything else becomes "_". None of them needs quoting
# when the path is passed back in an override (resume=..., model.init_from=...): Hydra reads
# "=" as a second assignment and "," as a sweep, so key=value,key=value names could not be.
_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-+.:@%~")


def short_dirname(name: str) -> str:
    """A run directory name from Hydra's ``override_dirname``, at most MAX_DIRNAME characters:
    a long one (a sweep with many overrides) keeps its start and ends in a hash of the whole,
    so the same overrides always map to the same directory and resume still finds it."""
    if len(name) <= MAX_DIRNAME:
        return name
    import hashlib
    digest = hashlib.sha1(name.encode()).hexdigest()[:12]
    return f"{name[:MAX_DIRNAME - 13]}-{digest}"


def _safe(text: str) -> str:
    return "".join(ch if ch in _SAFE else "_" for ch in text)


def safe_dirname(overrides: str) -> str:
    """``model.mask_ratio=0.4,data.img_size=64`` -> ``model.mask_ratio:0.4+data.img_size:64``: a
    name that can be passed back to our own overrides unquoted (lists lose their brackets:
    ``data.crop_scale:0.35+1.0``)."""
    text = overrides.replace("=", ":").replace(",", "+")
    return short_dirname(_safe("".join(ch for ch in text if ch not in "[](){}'\" ")))


def run_subdir(parent: str, overrides: str) -> str:
    """The run directory's last component under ``parent``: :func:`safe_dirname`, unless a run
    directory of the older ``key=value,...`` naming exists there and the new one does not, in
    which case that one (so runs started before the naming changed still resume)."""
    new, old = safe_dirname(overrides), short_dirname(overrides)
    if new != old and not (Path(parent) / new).exists() and (Path(parent) / old).is_dir():
        return old
    return new


def init_tag(init_from: Optional[str]) -> str:
    """``scratch``, or ``from-<name>`` for an init file (its stem) or a run directory (the run's
    name, and its override segment when it has one), made safe: part of the run name, so training
    from scratch and from different inits do not share (and refuse) one run directory."""
    if not init_from:
        return "scratch"
    p = Path(str(init_from).rstrip("/"))
    if p.name in ("last.pt", "checkpoints"):
        p = p.parent.parent if p.name == "last.pt" and p.parent.name == "checkpoints" else p.parent
    if p.suffix in (".pt", ".pth", ".safetensors") and not p.is_dir():
        return "from-" + _safe(p.stem)
    name = p.name
    if p.parent.name and p.parent.name != name and _run_name_of(p) == p.parent.name:
        name = f"{p.parent.name}+{p.name}"  # outputs/<run_name>/<overrides>
    return "from-" + short_dirname(_safe(name))


def _run_name_of(run_dir: Path) -> str | None:
    try:
        return str(OmegaConf.load(run_dir / "config.yaml").get("run_name"))
    except Exception:  # not a run directory, or an unreadable config: name it by its path
        return None


def init_suffix(init_from: Optional[str]) -> str:
    """Pretraining's run name: nothing from scratch (the names runs always had), ``-from-<name>``
    when the encoder starts from ``init_from``."""
    return "" if not init_from else "-" + init_tag(init_from)


def register_configs() -> None:
    if not OmegaConf.has_resolver("fcmae_init_tag"):
        OmegaConf.register_new_resolver("fcmae_init_tag", init_tag)
    if not OmegaConf.has_resolver("fcmae_init_suffix"):
        OmegaConf.register_new_resolver("fcmae_init_suffix", init_suffix)
    if not OmegaConf.has_resolver("fcmae_subdir"):
        OmegaConf.register_new_resolver("fcmae_subdir", run_subdir)
    cs = ConfigStore.instance()
    cs.store(name="pretrain_schema", node=PretrainConfig)
    cs.store(name="finetune_schema", node=FinetuneConfig)


class ConfigError(UserError, ValueError):
    """Invalid configuration values; the message lists every problem and how to fix it."""


def validate(cfg: Any) -> None:
    """Range checks that the type system cannot express. Raises :class:`ConfigError`."""
    errors, check = _collector()
    m, d = cfg.model, cfg.data
    check(0.0 <= m.mask_ratio < 1.0, f"model.mask_ratio={m.mask_ratio} must be in [0, 1)")
    check(len(m.depths) == 4 and len(m.dims) == 4, "model.depths and model.dims need 4 entries each")
    check(m.decoder_depth >= 1 and m.decoder_embed_dim >= 1, "model.decoder_depth and decoder_embed_dim must be >= 1")
    check(cfg.encoder.backend in BACKENDS,
          f"encoder.backend={cfg.encoder.backend!r}; use {', '.join(BACKENDS[:-1])} or {BACKENDS[-1]}")
    check(cfg.encoder.dwconv in DWCONV, f"encoder.dwconv={cfg.encoder.dwconv!r}; use auto, canvas or tiles")
    check(cfg.encoder.grn_stats in GRN_STATS, f"encoder.grn_stats={cfg.encoder.grn_stats!r}; use {' or '.join(GRN_STATS)}")
    if cfg.encoder.backend == "minkowski":
        try:
            from .sparse.me_compat import import_minkowski
            import_minkowski()
        except ImportError as exc:
            errors.append(str(exc))
    check(d.img_size > 0 and d.img_size % 32 == 0,
          f"data.img_size={d.img_size} must be a positive multiple of 32 (e.g. 224)")
    if d.img_size > 0 and d.img_size % 32 == 0:
        patches = (d.img_size // 32) ** 2
        check(int(patches * (1 - m.mask_ratio)) >= 1,
              f"model.mask_ratio={m.mask_ratio} leaves no visible patch at data.img_size={d.img_size}")
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
    _check_channels(d, m.in_chans, check, auto_stats=True)
    check(d.stats_images >= 1, f"data.stats_images={d.stats_images} must be >= 1")
    vb = cfg.vis.bands
    check(vb is None or (len(vb) in (1, 3) and all(0 <= b < m.in_chans for b in vb)),
          f"vis.bands={vb}: one or three band indices below model.in_chans={m.in_chans}")
    _check_eval(cfg.eval, check)
    _check_training(cfg, check)
    known = {f"convnextv2_{k}" for k in VARIANTS}
    check(m.name in known or m.name.startswith("custom"), f"model.name={m.name!r}; use one of {sorted(known)} or custom_*")
    if m.name in known:
        v = VARIANTS[m.name.removeprefix("convnextv2_")]
        check(list(m.depths) == list(v.depths) and list(m.dims) == list(v.dims),
              f"model.depths/dims do not match {m.name}; select the size with model={m.name} "
              "rather than overriding depths/dims, or name a custom shape model.name=custom_...")
    _raise(errors)


def auto_band_stats(data_cfg) -> bool:
    """``data.mean=auto`` (or ``data.std=auto``): both are computed at start."""
    return "auto" in (data_cfg.mean, data_cfg.std)


def _check_channels(d, in_chans: int, check, auto_stats: bool = False) -> None:
    """data.channels / data.bands / data.mean / data.std against model.in_chans: one line per problem."""
    from .data.image_io import CHANNEL_MODES, NPY_LAYOUTS
    check(d.channels in CHANNEL_MODES, f"data.channels={d.channels!r}; use rgb, grey or all")
    check(d.npy_layout in NPY_LAYOUTS, f"data.npy_layout={d.npy_layout!r}; use hwc or chw")
    check(in_chans >= 1, f"model.in_chans={in_chans} must be >= 1")
    if d.bands is not None:
        check(d.channels == "all", f"data.bands={list(d.bands)} picks bands of data.channels=all (not {d.channels})")
        check(len(d.bands) == in_chans and min(d.bands, default=0) >= 0,
              f"data.bands={list(d.bands)} keeps {len(d.bands)} bands; model.in_chans={in_chans} must match")
    elif d.channels == "rgb":
        check(in_chans == 3, f"model.in_chans={in_chans} with data.channels=rgb (3 bands); for one band use "
                             "data.channels=grey, for every band of the files data.channels=all")
    elif d.channels == "grey":
        check(in_chans == 1, f"model.in_chans={in_chans} with data.channels=grey (1 band): set model.in_chans=1")
    for key in ("mean", "std"):
        value = getattr(d, key)
        if auto_stats and auto_band_stats(d):
            continue
        ok = isinstance(value, (list, tuple)) or OmegaConf.is_list(value)
        ok = ok and all(isinstance(v, (int, float)) for v in value)
        fix = "; or data.mean=auto to compute them at start" if auto_stats else ""
        check(ok and len(value) == in_chans,
              f"data.{key}={value if not ok else list(value)} needs {in_chans} numbers, one per band (model.in_chans); "
              f"`fcmae-stats SOURCE` prints them{fix}")
        if ok and key == "std":
            check(all(v > 0 for v in value), f"data.std={list(value)} must be > 0")


def _collector():
    """``(errors, check)``: ``check(ok, msg)`` records ``msg`` when ``ok`` is false, so one
    run reports every problem at once."""
    errors: list[str] = []

    def check(ok: bool, msg: str) -> None:
        if not ok:
            errors.append(msg)
    return errors, check


def _raise(errors: list[str]) -> None:
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


def _check_eval(e, check) -> None:
    check(e.name in ("none", "knn", "linear", "knn+linear"), f"eval.name={e.name!r}; use eval=none, knn, linear or knn+linear")
    if e.name == "none":
        return
    check(e.source in LABELLED_SOURCES, f"eval.source={e.source!r}; use one of {', '.join(LABELLED_SOURCES)}")
    check(e.source not in ROOTED_LABELLED or (bool(e.train_root) and bool(e.val_root)),
          f"eval.source={e.source} needs eval.train_root=... and eval.val_root=... (folders, or list files)")
    check(all(n is None or n > 0 for n in (e.labels_per_class, e.val_per_class)),
          "eval.labels_per_class and eval.val_per_class must be > 0 (or null: all images)")
    check(e.img_size is None or (e.img_size > 0 and e.img_size % 32 == 0), "eval.img_size must be a multiple of 32")
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


def validate_finetune(cfg: Any) -> None:
    """Range checks for ``fcmae-finetune``. Raises :class:`ConfigError`."""
    errors, check = _collector()
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
    check(d.img_size > 0 and d.img_size % 32 == 0, f"data.img_size={d.img_size} must be a positive multiple of 32")
    check(d.batch_size > 0 and d.num_workers >= 0, "data.batch_size must be > 0 and data.num_workers >= 0")
    check(0 < d.crop_pct <= 1, "data.crop_pct must be in (0, 1]")
    check(0.0 <= d.re_prob <= 1.0 and d.re_count >= 1 and d.re_mode in ("const", "rand", "pixel"),
          "data.re_prob must be in [0, 1], data.re_count >= 1, data.re_mode const, rand or pixel")
    check(d.interpolation in ("bicubic", "bilinear", "nearest", "random"),
          f"data.interpolation={d.interpolation!r}; use bicubic, bilinear, nearest or random")
    check(d.color_jitter is None or d.color_jitter >= 0, "data.color_jitter must be >= 0 (or null)")
    _check_channels(d, m.in_chans, check)
    if not errors:  # timm's transform factory judges the augmentation keys (e.g. a bad RandAugment string)
        try:
            from .data.transforms import finetune_transform
            finetune_transform(d)
        except Exception as exc:
            errors.append(f"the training transform cannot be built from data.* ({type(exc).__name__}: {exc}); "
                          "check data.auto_augment (e.g. rand-m9-mstd0.5-inc1, or null), data.re_mode, "
                          "data.interpolation")
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
    _raise(errors)

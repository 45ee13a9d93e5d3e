"""The structured configs Hydra type-checks (``conf/`` fills them): a misspelled key or a wrong type
fails at start with Hydra's own message. One dataclass per config group; the image fields both
apps read are :class:`ImageDataConfig`, which each app's data config extends."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# conf/ of a source checkout; an installed wheel carries it as the package fcmae.conf.
_SOURCE_CONF = Path(__file__).resolve().parents[2] / "conf"
CONFIG_PATH = str(_SOURCE_CONF) if _SOURCE_CONF.is_dir() else "pkg://fcmae.conf"

COMPILE_CHOICES = ("auto", "true", "false")
CHECKPOINTING_CHOICES = ("off", "stage", "block")
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
    patch_size: int = 32  # mask patch in pixels (a multiple of 8: 32, 16, 8); the stem's stride is patch_size / 8


@dataclass
class EncoderConfig:
    backend: str = "sparse"  # sparse | dense | minkowski
    grn_stats: str = "sample"  # sample | batch (the official MinkowskiGRN)
    dwconv: str = "auto"  # the sparse backend's depthwise conv: auto (tiles on CUDA with Triton) | canvas | tiles


@dataclass
class ImageDataConfig:
    """The image fields both apps read (``data.*``): size, batching, how a file becomes the input, and
    the normalisation; each app's data config extends it."""
    img_size: Any = 224  # one size (square) or [height, width], each a multiple of model.patch_size
    batch_size: int = 16  # per GPU / per process
    num_workers: int = 2
    pin_memory: bool = True
    persistent_workers: bool = True
    synthetic_classes: int = 8
    hflip: bool = True
    # one value per band (model.in_chans), in the units the data is read in (integers / their type's max)
    mean: Any = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: Any = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # how a file becomes the input: rgb (8-bit RGB) | grey (one band) | all (every band of the file, in order)
    channels: str = "rgb"
    bands: Optional[list[int]] = None  # with channels=all: keep these bands, in this order
    npy_layout: str = "hwc"  # .npy arrays: hwc (H, W, C) | chw (C, H, W)
    max_bad_fraction: float = 0.01  # unreadable images tolerated before the run fails
    # seconds one batch may take to arrive before the read counts as hung (a clear error after a
    # checkpoint); null or 0: wait forever
    read_timeout: Optional[float] = 600.0


@dataclass
class DataConfig(ImageDataConfig):
    source: str = "synthetic"  # synthetic | imagefolder | folder | filelist | shards | fashion_mnist
    # a directory, the list file for filelist, the packed folder (or URL) for shards; fashion_mnist: null = Debian's
    root: Optional[str] = None
    synthetic_images: int = 2048
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    # data.mean=auto (and std): computed at start over data.stats_images images (fcmae-stats SOURCE prints them)
    stats_images: int = 1000
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
    # stop when a step's loss passes this many times the run's lowest (finite, but diverged); null: never
    divergence_stop: Optional[float] = 1000.0
    # recompute activations in the backward instead of keeping them: off | stage | block (less memory, more time;
    # the same gradients)
    activation_checkpointing: str = "off"
    # the step's memory plan (fcmae-plan) in the start-up log and, on a GPU, checked against the measured peak
    # after the first steps: auto (on a GPU) | on | off. Pretraining only.
    memory_plan: str = "auto"


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
    # the pretraining's mask patch (32, 16, 8: the stem's stride x 8); null = read from init_from's stem (32 without)
    patch_size: Optional[int] = None


@dataclass
class FinetuneDataConfig(ImageDataConfig):
    source: str = "synthetic"  # synthetic | imagefolder | filelist | fashion_mnist
    # imagefolder: root/<class>/<image>; filelist: a text file of 'path class_name' lines;
    # fashion_mnist: the IDX folder, null = Debian's
    train_root: Optional[str] = None
    val_root: Optional[str] = None
    labels_per_class: Optional[int] = None  # low-label fine-tuning: this many train images per class
    labels_seed: int = 0  # which images: a fixed draw for this seed
    val_per_class: Optional[int] = None  # validate on this many images per class (fixed draw); null = all
    batch_size: int = 32  # per GPU / per process
    synthetic_images: int = 1024
    synthetic_val_images: int = 256
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    # The official training transform (timm create_transform), official defaults:
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"  # RandAugment policy; null = none
    color_jitter: Optional[float] = None  # used only without auto_augment (official default: none)
    interpolation: str = "bicubic"
    re_prob: float = 0.25  # random erasing probability
    re_mode: str = "pixel"  # const | rand | pixel
    re_count: int = 1
    crop_pct: float = 0.875  # evaluation: resize to img_size / crop_pct, centre crop (plain resize at >= 384)
    # null: from model.init_from's run or export where it records them, else ImageNet's (3 bands); auto:
    # computed at start over the training images; or one number per band
    mean: Any = None
    std: Any = None


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


def store_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="pretrain_schema", node=PretrainConfig)
    cs.store(name="finetune_schema", node=FinetuneConfig)

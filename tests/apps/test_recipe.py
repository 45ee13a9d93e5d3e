"""The official ConvNeXt V2 recipes, pinned against independent references: layer decay and
weight decay as the official ``optim_factory.py`` / timm 0.3.2 assign them (re-derived here
on the official parameter names), the official train/eval transforms, the presets against
``TRAINING.md`` line by line, and the model EMA against a hand-computed average."""
import math

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from fcmae import create_fcmae
from fcmae.storage.checkpoint import load_checkpoint
from fcmae.pretrain import CONFIG_PATH
from fcmae.data.transforms import eval_transform, finetune_transform
from fcmae.finetune import build_classifier, build_optimizer
from fcmae.finetune import run as finetune
from fcmae.optim import param_groups, set_lr

FT_TINY = ["data.img_size=64", "data.batch_size=4", "data.num_workers=0", "data.synthetic_images=16",
           "data.synthetic_val_images=8", "trainer.epochs=2", "trainer.log_every=1", "trainer.progress=log",
           "schedule.warmup_steps=0"]


def compose_cfg(name, *overrides):
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base=None):
        return compose(name, overrides=list(overrides))


# ---------------------------------------------------------------- layer decay (fine-tuning)

def official_name(timm_name: str) -> str:
    """timm ``convnextv2`` parameter name -> the official ``models/convnextv2.py`` name."""
    p = timm_name.split(".")
    if p[0] == "stem":
        return ".".join(["downsample_layers", "0", *p[1:]])
    if p[0] == "stages" and p[2] == "downsample":
        return ".".join(["downsample_layers", p[1], *p[3:]])
    if p[0] == "stages" and p[2] == "blocks":
        return ".".join(["stages", p[1], p[3], *p[4:]])
    assert p[0] == "head", timm_name
    return {"norm": "norm", "fc": "head"}[p[1]] + "." + p[2]


def official_layer_id(name: str, depths, decay_type: str) -> int:
    """A transcription of the official ``get_num_layer_for_convnext{_single,}`` on official names."""
    parts = name.split(".")
    if decay_type == "single":
        if parts[0] == "downsample_layers":
            return sum(depths[:int(parts[1])]) + 1
        if parts[0] == "stages":
            return sum(depths[:int(parts[1])]) + int(parts[2]) + 1
        return sum(depths) + 1
    if parts[0] == "downsample_layers":
        return {0: 0, 1: 2, 2: 3, 3: 12}[int(parts[1])]
    if parts[0] == "stages":
        stage, block = int(parts[1]), int(parts[2])
        return {0: 1, 1: 2, 3: 12}[stage] if stage != 2 else 3 + block // 3
    return 13


@pytest.mark.parametrize("size,depths,decay_type,decay", [
    ("atto", [2, 2, 6, 2], "single", 0.9),   # TRAINING.md ConvNeXt-A: --layer_decay_type 'single' --layer_decay 0.9
    ("tiny", [3, 3, 9, 3], "single", 0.9),   # TRAINING.md ConvNeXt-T: --layer_decay_type 'single' --layer_decay 0.9
    ("base", [3, 3, 27, 3], "group", 0.6),   # TRAINING.md Base: --layer_decay_type 'group' --layer_decay 0.6
    ("atto", [2, 2, 6, 2], "group", 0.6),    # the other assignment on a small model, too
])
def test_layer_decay_matches_the_official_assignment(size, depths, decay_type, decay):
    with torch.device("meta"):  # names and shapes only: base is 88M parameters
        clf = build_classifier(f"convnextv2_{size}", 10, 0.0, 1.0)
    cfg = compose_cfg("finetune", f"optim.layer_decay={decay}", f"optim.layer_decay_type={decay_type}").optim
    opt = build_optimizer(clf, cfg, lr=1.0)
    set_lr(opt, 1.0)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    num_layers = 12 if decay_type == "group" else sum(depths)  # main_finetune.py
    scales = [decay ** (num_layers + 1 - i) for i in range(num_layers + 2)]
    named = dict(clf.named_parameters())
    assert len(lr_of) == len(named)  # every parameter is trained
    for name, p in named.items():
        official = official_name(name)
        assert lr_of[id(p)] == pytest.approx(scales[official_layer_id(official, depths, decay_type)], rel=1e-12), name
        # official get_parameter_groups: 1-D, '.bias', '.gamma', '.beta' are not decayed
        no_decay = p.ndim == 1 or official.endswith((".bias", ".gamma", ".beta"))
        assert wd_of[id(p)] == (0.0 if no_decay else cfg.weight_decay), name
    if decay_type == "group":  # 14 levels; the stem at decay**13, stage 2 in groups of 3 blocks
        assert lr_of[id(named["stem.0.weight"])] == pytest.approx(decay ** 13)
        assert lr_of[id(named["stages.2.blocks.2.conv_dw.weight"])] == pytest.approx(decay ** 10)
        assert lr_of[id(named["stages.2.blocks.3.conv_dw.weight"])] == pytest.approx(decay ** 9)
    else:  # the stem shares block 0's level
        assert lr_of[id(named["stem.0.weight"])] == lr_of[id(named["stages.0.blocks.0.conv_dw.weight"])]
    assert lr_of[id(named["head.fc.weight"])] == 1.0


def test_no_layer_decay_trains_everything_at_the_full_lr():
    clf = build_classifier("convnextv2_atto", 5, 0.0, 1.0)
    opt = build_optimizer(clf, compose_cfg("finetune", "optim.layer_decay=1.0").optim, lr=0.5)
    set_lr(opt, 0.5)
    assert {g["lr"] for g in opt.param_groups} == {0.5}


# ---------------------------------------------------------------- weight decay (pretraining)

@pytest.mark.parametrize("decay_grn_and_mask_token", [True, False])
def test_pretraining_weight_decay_follows_the_official_rule(decay_grn_and_mask_token):
    model = create_fcmae("convnextv2_atto")
    decayed, skipped = param_groups(model, 0.05, decay_grn_and_mask_token)
    assert decayed["weight_decay"] == 0.05 and skipped["weight_decay"] == 0.0
    in_decay = {id(p) for p in decayed["params"]}
    for name, p in model.named_parameters():
        # timm 0.3.2 add_weight_decay, as main_pretrain.py calls it: only 1-D and '.bias' are skipped
        official = not (p.ndim == 1 or name.endswith(".bias"))
        if not decay_grn_and_mask_token and (".grn." in name or name == "mask_token"):
            official = False
        assert (id(p) in in_decay) == official, name
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = {names[i] for i in in_decay}
    # The two parameters the rules disagree on (shape (1, 512, 1, 1) and (1, 1, 1, 4C)):
    assert ("mask_token" in decayed_names) == decay_grn_and_mask_token
    assert ("encoder.stages.0.0.grn.gamma" in decayed_names) == decay_grn_and_mask_token


# ---------------------------------------------------------------- transforms

def test_finetune_transform_is_the_official_one():
    cfg = compose_cfg("finetune", "experiment=ft_atto", "data.img_size=224").data  # the official presets
    text = repr(finetune_transform(cfg))
    # timm create_transform(auto_augment='rand-m9-mstd0.5-inc1', re_prob=0.25, re_mode='pixel', re_count=1)
    assert "RandAugment(n=2" in text and "m=9, mstd=0.5" in text and "SolarizeIncreasing" in text
    assert "RandomErasing(p=0.25, mode=pixel, count=(1, 1))" in text
    assert "RandomResizedCropAndInterpolation(size=(224, 224), scale=(0.08, 1.0)" in text
    assert "interpolation=bicubic" in text and "RandomHorizontalFlip(p=0.5)" in text
    assert "ColorJitter" not in text  # --color_jitter default None, and ignored under RandAugment anyway
    off = repr(finetune_transform(compose_cfg("finetune", "experiment=ft_atto", "data.auto_augment=null",
                                              "data.re_prob=0").data))
    assert "RandAugment" not in off and "RandomErasing" not in off
    demo = repr(finetune_transform(compose_cfg("finetune").data))  # the CPU demo trains without augmentation
    assert "RandAugment" not in demo and "RandomErasing" not in demo and "scale=(1.0, 1.0)" in demo


def test_randaugment_posterize_survives_zero_bits():
    """At magnitude 10 (m9 + noise, clipped) PosterizeIncreasing keeps 0 bits: a black image,
    as with the Pillow the official code ran on (newer Pillow raises instead)."""
    tf = finetune_transform(compose_cfg("finetune", "experiment=ft_atto", "data.img_size=64").data)
    ops = [op for step in tf.transforms for op in getattr(step, "ops", ()) if op.name == "PosterizeIncreasing"]
    assert len(ops) == 1
    op = ops[0]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    img = Image.new("RGB", (64, 64), (200, 120, 37))
    assert np.asarray(op(img)).max() == 0
    op.magnitude = 5  # 4 - int(0.5 * 4) = 2 bits kept: 200 -> 192, 120 -> 64, 37 -> 0
    assert np.asarray(op(img))[0, 0].tolist() == [192, 64, 0]


@pytest.mark.parametrize("size,resized,cropped", [(224, (292, 256), True), (384, (384, 384), False)])
def test_eval_transform_gives_the_official_sizes(size, resized, cropped):
    """datasets.py: below 384 resize the short side to int(size / 0.875) and centre crop; at 384
    and above warp to size x size. A 400x350 image with a bright column on its left edge shows
    which happened: a centre crop after the short-side resize cuts that column off."""
    img = Image.new("RGB", (400, 350), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 40, 350))  # the left 10% is white
    tf = eval_transform(size)
    out = tf(img)
    assert out.shape == (3, size, size)
    steps = list(tf.transforms)
    assert (steps[0].size == resized[1] if cropped else tuple(steps[0].size) == resized)
    # short side 350 -> 256: width 292; a 224 centre crop drops 34 columns each side, the white is 11 wide
    left = out[0, :, : size // 20].mean()
    assert (left < 0) == cropped  # normalised black is negative; the white column survives only a warp


# ---------------------------------------------------------------- presets vs TRAINING.md

# (preset, config key, value, the TRAINING.md line it comes from)
FT_PRESETS = [
    ("ft_atto", "model.name", "convnextv2_atto", "--model convnextv2_atto"),
    ("ft_atto", "data.batch_size", 32, "--batch_size 32 --update_freq 4 (x 8 GPUs)"),
    ("ft_atto", "optim.effective_batch_size", 1024, "--batch_size 32 --update_freq 4 (x 8 GPUs)"),
    ("ft_atto", "optim.blr", 2e-4, "--blr 2e-4"),
    ("ft_atto", "trainer.epochs", 600, "--epochs 600"),
    ("ft_atto", "schedule.warmup_epochs", 0, "--warmup_epochs 0"),
    ("ft_atto", "optim.layer_decay_type", "single", "--layer_decay_type 'single'"),
    ("ft_atto", "optim.layer_decay", 0.9, "--layer_decay 0.9"),
    ("ft_atto", "optim.weight_decay", 0.3, "--weight_decay 0.3"),
    ("ft_atto", "model.drop_path_rate", 0.1, "--drop_path 0.1"),
    ("ft_atto", "data.re_prob", 0.25, "--reprob 0.25"),
    ("ft_atto", "mixup.mixup", 0.0, "--mixup 0."),
    ("ft_atto", "mixup.cutmix", 0.0, "--cutmix 0."),
    ("ft_atto", "mixup.label_smoothing", 0.2, "--smoothing 0.2"),
    ("ft_atto", "ema.enabled", True, "--model_ema True"),
    ("ft_atto", "ema.eval", True, "--model_ema_eval True"),
    ("ft_atto", "trainer.precision", "fp16", "--use_amp True"),
    ("ft_tiny", "model.name", "convnextv2_tiny", "--model convnextv2_tiny"),
    ("ft_tiny", "data.batch_size", 32, "--batch_size 32 --update_freq 4"),
    ("ft_tiny", "optim.effective_batch_size", 1024, "--batch_size 32 --update_freq 4 (x 8 GPUs)"),
    ("ft_tiny", "optim.blr", 8e-4, "--blr 8e-4"),
    ("ft_tiny", "trainer.epochs", 300, "--epochs 300"),
    ("ft_tiny", "schedule.warmup_epochs", 40, "--warmup_epochs 40"),
    ("ft_tiny", "optim.layer_decay_type", "single", "--layer_decay_type 'single'"),
    ("ft_tiny", "optim.layer_decay", 0.9, "--layer_decay 0.9"),
    ("ft_tiny", "optim.weight_decay", 0.05, "--weight_decay 0.05"),
    ("ft_tiny", "model.drop_path_rate", 0.2, "--drop_path 0.2"),
    ("ft_tiny", "data.re_prob", 0.25, "--reprob 0.25"),
    ("ft_tiny", "mixup.mixup", 0.8, "--mixup 0.8"),
    ("ft_tiny", "mixup.cutmix", 1.0, "--cutmix 1.0"),
    ("ft_tiny", "mixup.label_smoothing", 0.1, "--smoothing 0.1"),
    ("ft_tiny", "ema.enabled", True, "--model_ema True"),
    ("ft_tiny", "ema.eval", True, "--model_ema_eval True"),
    ("ft_tiny", "trainer.precision", "fp16", "--use_amp True"),
    ("ft_base", "model.name", "convnextv2_base", "--model convnextv2_base"),
    ("ft_base", "data.batch_size", 32, "--batch_size 32 --update_freq 4"),
    ("ft_base", "optim.effective_batch_size", 1024, "--batch_size 32 --update_freq 4 (x 8 GPUs)"),
    ("ft_base", "optim.blr", 6.25e-4, "--blr 6.25e-4"),
    ("ft_base", "trainer.epochs", 100, "--epochs 100"),
    ("ft_base", "schedule.warmup_epochs", 20, "--warmup_epochs 20"),
    ("ft_base", "optim.layer_decay_type", "group", "--layer_decay_type 'group'"),
    ("ft_base", "optim.layer_decay", 0.6, "--layer_decay 0.6"),
    ("ft_base", "optim.weight_decay", 0.05, "--weight_decay 0.05"),
    ("ft_base", "model.drop_path_rate", 0.1, "--drop_path 0.1"),
    ("ft_base", "data.re_prob", 0.25, "--reprob 0.25"),
    ("ft_base", "mixup.mixup", 0.8, "--mixup 0.8"),
    ("ft_base", "mixup.cutmix", 1.0, "--cutmix 1.0"),
    ("ft_base", "mixup.label_smoothing", 0.1, "--smoothing 0.1"),
    ("ft_base", "ema.enabled", True, "--model_ema True"),
    ("ft_base", "ema.eval", True, "--model_ema_eval True"),
    ("ft_base", "trainer.precision", "fp16", "--use_amp True"),
]
# main_finetune.py defaults every preset inherits (argparse defaults, not on the command line)
FT_DEFAULTS = [
    ("ema.decay", 0.9999, "--model_ema_decay default 0.9999"),
    ("optim.min_lr", 1e-6, "--min_lr default 1e-6"),
    ("data.auto_augment", "rand-m9-mstd0.5-inc1", "--aa default"),
    ("data.color_jitter", None, "--color_jitter default None"),
    ("data.interpolation", "bicubic", "--train_interpolation default"),
    ("data.re_mode", "pixel", "--remode default"),
    ("data.re_count", 1, "--recount default"),
    ("data.img_size", 224, "--input_size default 224"),
    ("model.head_init_scale", 0.001, "--head_init_scale default 0.001"),
    ("optim.betas", [0.9, 0.999], "--opt_betas default None: AdamW's (0.9, 0.999)"),
    ("mixup.prob", 1.0, "--mixup_prob default"),
    ("mixup.switch_prob", 0.5, "--mixup_switch_prob default"),
]
# TRAINING.md pre-training (8 nodes x 8 GPUs) and main_pretrain.py defaults
PRETRAIN_PRESETS = [
    ("in1k_fcmae_release", "data.batch_size", 64, "--batch_size 64"),
    ("in1k_fcmae_release", "optim.effective_batch_size", 4096, "--nodes 8 --ngpus 8 --batch_size 64"),
    ("in1k_fcmae_release", "optim.blr", 1.5e-4, "--blr 1.5e-4"),
    ("in1k_fcmae_release", "trainer.epochs", 1600, "--epochs 1600"),
    ("in1k_fcmae_release", "schedule.warmup_epochs", 40, "--warmup_epochs 40"),
    ("in1k_fcmae_release", "encoder.grn_stats", "batch", "MinkowskiGRN: statistics over the batch's active sites"),
    ("in1k_fcmae", "trainer.epochs", 800, "--epochs default 800 (the paper)"),
    ("in1k_fcmae", "encoder.grn_stats", "sample", "per-sample GRN (the paper's definition)"),
]
PRETRAIN_DEFAULTS = [
    ("model.mask_ratio", 0.6, "--mask_ratio default 0.6"),
    ("model.norm_pix_loss", True, "set_defaults(norm_pix_loss=True)"),
    ("model.decoder_depth", 1, "--decoder_depth default 1"),
    ("model.decoder_embed_dim", 512, "--decoder_embed_dim default 512"),
    ("optim.weight_decay", 0.05, "--weight_decay default 0.05"),
    ("optim.min_lr", 0.0, "--min_lr default 0"),
    ("optim.betas", [0.9, 0.95], "AdamW(betas=(0.9, 0.95))"),
    ("optim.decay_grn_and_mask_token", True, "timm 0.3.2 add_weight_decay"),
    ("data.img_size", 224, "--input_size default 224"),
    ("data.crop_scale", [0.2, 1.0], "RandomResizedCrop(scale=(0.2, 1.0))"),
    ("data.hflip", True, "RandomHorizontalFlip()"),
]


def lookup(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return list(cfg) if hasattr(cfg, "__len__") and not isinstance(cfg, str) else cfg


@pytest.mark.parametrize("preset", ["ft_atto", "ft_tiny", "ft_base"])
def test_finetune_presets_equal_training_md(preset):
    cfg = compose_cfg("finetune", f"experiment={preset}")
    rows = [(k, v, line) for p, k, v, line in FT_PRESETS if p == preset] + FT_DEFAULTS
    wrong = [(k, lookup(cfg, k), v, line) for k, v, line in rows if lookup(cfg, k) != v]
    assert not wrong, wrong


@pytest.mark.parametrize("preset", ["in1k_fcmae", "in1k_fcmae_release"])
def test_pretrain_presets_equal_training_md(preset):
    cfg = compose_cfg("pretrain", f"experiment={preset}", "model=convnextv2_base")
    rows = [(k, v, line) for p, k, v, line in PRETRAIN_PRESETS if p == preset] + PRETRAIN_DEFAULTS
    if preset == "in1k_fcmae":  # the paper's setting shares the release's per-step recipe
        rows += [(k, v, line) for p, k, v, line in PRETRAIN_PRESETS
                 if p == "in1k_fcmae_release" and k not in ("trainer.epochs", "encoder.grn_stats")]
    wrong = [(k, lookup(cfg, k), v, line) for k, v, line in rows if lookup(cfg, k) != v]
    assert not wrong, wrong
    assert cfg.model.name == "convnextv2_base"


# ---------------------------------------------------------------- model EMA

def test_ema_equals_a_hand_computed_average(tmp_path, monkeypatch):
    decay, steps = 0.9, 4
    args = [*FT_TINY, "ema.enabled=true", "ema.eval=true", f"ema.decay={decay}"]
    weights = []

    def snapshot(model):
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    import fcmae.finetune as ft
    build = ft.build_optimizer

    def build_and_snapshot(model, *a, **kw):  # the initial weights the EMA starts from
        snapshot(model)
        return build(model, *a, **kw)

    monkeypatch.setattr(ft, "build_optimizer", build_and_snapshot)
    finetune(compose_cfg("finetune", *args, f"trainer.max_steps={steps}"), tmp_path,
             callbacks=[lambda loop: snapshot(loop.raw_model)])  # after every optimizer step
    assert len(weights) == steps + 1
    ck = load_checkpoint(tmp_path / "checkpoints/last.pt")
    for key in ("stem.0.weight", "stages.3.blocks.1.mlp.fc2.weight", "head.fc.weight", "head.norm.bias"):
        expected = weights[0][key].double()
        for w in weights[1:]:
            expected = decay * expected + (1 - decay) * w[key].double()
        got = ck["model_ema"][key].double()
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-8), key
        assert not torch.allclose(got, ck["model"][key].double())  # really an average, not the raw weights
    assert math.isfinite(ck["best"]["val_ema/best_top1"]) and (tmp_path / "checkpoints/best-ema.pt").exists()


def test_resume_with_ema_is_bit_identical_and_keeps_the_best(tmp_path):
    args = [*FT_TINY, "ema.enabled=true", "ema.eval=true", "ema.decay=0.8"]
    finetune(compose_cfg("finetune", *args, "trainer.max_steps=6"), tmp_path / "straight")
    finetune(compose_cfg("finetune", *args, "trainer.max_steps=3"), tmp_path / "split")
    finetune(compose_cfg("finetune", *args, "trainer.max_steps=6"), tmp_path / "split")
    a = load_checkpoint(tmp_path / "straight/checkpoints/last.pt")
    b = load_checkpoint(tmp_path / "split/checkpoints/last.pt")
    for part in ("model", "model_ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert a["best"] == b["best"]  # the best top-1 survives the resume
    for name in ("best.pt", "best-ema.pt"):
        assert (tmp_path / "split/checkpoints" / name).exists()
    # --ema exports the average, not the raw weights
    from safetensors.torch import load_file
    from fcmae.export.exporter import export
    out = load_file(export(tmp_path / "split", "timm", tmp_path / "ema.safetensors", log=lambda *_: None, ema=True))
    assert torch.equal(out["stages.0.blocks.0.conv_dw.weight"], b["model_ema"]["stages.0.blocks.0.conv_dw.weight"])
    assert not torch.equal(out["stages.0.blocks.0.conv_dw.weight"], b["model"]["stages.0.blocks.0.conv_dw.weight"])
    # eval_only on the finished run reproduces the scores its last evaluation logged
    import json
    logged = [json.loads(line) for line in (tmp_path / "split/metrics.jsonl").read_text().splitlines()]
    logged = [m for m in logged if "val/top1" in m][-1]
    scores = finetune(compose_cfg("finetune", *args, "eval_only=true", f"model.init_from={tmp_path / 'split'}"),
                      tmp_path / "unused")
    for key in ("val/top1", "val/top5", "val_ema/top1"):
        assert scores[key] == pytest.approx(logged[key]), key
    assert scores["val/loss"] == pytest.approx(logged["val/loss"], rel=1e-5)

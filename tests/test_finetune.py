"""Fine-tuning and evaluation: loading exports into the classifier, layer decay, k-NN and
linear-probe scores against brute force, the fine-tune app end to end, and the
pretrain -> export -> fine-tune loop with a loss that must beat trivial predictors."""
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from fcmae import create_fcmae
from fcmae.checkpoint import load_checkpoint
from fcmae.convert import CheckpointError
from fcmae.evaluation import knn_accuracy, linear_probe_accuracy
from fcmae.export import export
from fcmae.finetune import build_classifier, build_optimizer, load_pretrained
from fcmae.finetune import run as finetune
from fcmae.optim import set_lr
from fcmae.pretrain import CONFIG_PATH
from fcmae.pretrain import run as pretrain

from conftest import rel_err

FT_TINY = ["data.img_size=64", "data.batch_size=4", "data.num_workers=0", "data.synthetic_images=16",
           "data.synthetic_val_images=8", "trainer.epochs=2", "trainer.log_every=1", "trainer.progress=log",
           "schedule.warmup_steps=0"]
PRE_TINY = ["data.img_size=64", "data.batch_size=8", "data.num_workers=0", "data.synthetic_images=64",
            "model.decoder_embed_dim=64", "schedule.warmup_steps=0", "trainer.progress=log", "model.mask_ratio=0.5"]


def compose_cfg(name, *overrides):
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base=None):
        return compose(name, overrides=list(overrides))


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_pretrained_weights_land_in_the_timm_classifier(tmp_path):
    model = create_fcmae("convnextv2_atto")
    torch.save({"model": model.state_dict()}, tmp_path / "ck.pt")
    exported = export(tmp_path / "ck.pt", "timm", tmp_path / "atto.safetensors", log=lambda *_: None)
    for source in (tmp_path / "ck.pt", exported):
        clf = build_classifier("convnextv2_atto", 5, 0.0, 0.001).eval()
        head_before = clf.head.fc.weight.clone()
        load_pretrained(clf, "convnextv2_atto", source)
        imgs = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            assert rel_err(clf.forward_features(imgs), model.encoder.forward_dense(imgs)) < 1e-5
        assert torch.equal(clf.head.fc.weight, head_before)  # the head stays fresh
    with pytest.raises(CheckpointError, match="holds convnextv2_atto weights but model.name=convnextv2_femto"):
        load_pretrained(build_classifier("convnextv2_femto", 5, 0.0, 1.0), "convnextv2_femto", exported)


def test_layer_decay_scales_every_block_its_own_level():
    clf = build_classifier("convnextv2_atto", 5, 0.0, 1.0)
    cfg = compose_cfg("finetune", "optim.layer_decay=0.5").optim
    opt = build_optimizer(clf, cfg, lr=1.0)
    set_lr(opt, 1.0)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(clf.named_parameters())
    # atto: stem, 12 blocks, head -> 14 levels; the head trains at the full lr, the stem at 0.5**13
    assert lr_of[id(named["head.fc.weight"])] == 1.0
    assert lr_of[id(named["stem.0.weight"])] == pytest.approx(0.5 ** 13)
    blocks = [n for n in named if n.endswith("conv_dw.weight")]
    lrs = [lr_of[id(named[n])] for n in blocks]
    assert lrs == sorted(lrs) and len(set(lrs)) == 12  # strictly rising with depth
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd_of[id(named["stages.0.blocks.0.mlp.grn.weight"])] == 0.0
    assert wd_of[id(named["stages.0.blocks.0.mlp.fc1.weight"])] == cfg.weight_decay


def test_knn_matches_a_brute_force_vote():
    g = torch.Generator().manual_seed(0)
    tf, vf = torch.randn(60, 8, generator=g), torch.randn(25, 8, generator=g)
    ty, vy = torch.randint(0, 7, (60,), generator=g), torch.randint(0, 7, (25,), generator=g)
    k, temp = 5, 0.1
    top1 = top5 = 0
    for i in range(25):
        sims = [(torch.nn.functional.cosine_similarity(vf[i], tf[j], dim=0).item(), int(ty[j])) for j in range(60)]
        sims.sort(reverse=True)
        votes = [0.0] * 7
        for s, c in sims[:k]:
            votes[c] += torch.tensor(s / temp).exp().item()
        order = sorted(range(7), key=lambda c: -votes[c])
        top1 += order[0] == vy[i]
        top5 += vy[i] in order[:5]
    got = knn_accuracy(tf, ty, vf, vy, 7, k=k, temperature=temp, chunk=10)
    assert got["knn_top1"] == pytest.approx(100 * top1 / 25)
    assert got["knn_top5"] == pytest.approx(100 * top5 / 25)


def test_linear_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    ty, vy = torch.arange(80) % 4, torch.arange(40) % 4
    centres = torch.randn(4, 16, generator=g) * 3
    tf = centres[ty] + torch.randn(80, 16, generator=g)
    vf = centres[vy] + torch.randn(40, 16, generator=g)
    assert linear_probe_accuracy(tf, ty, vf, vy, 4, steps=200)["linear_top1"] == 100.0
    shuffled = linear_probe_accuracy(tf, ty[torch.randperm(80, generator=g)], vf, vy, 4, steps=200)
    assert shuffled["linear_top1"] < 70.0  # labels unrelated to features: no free accuracy


def test_pretrain_eval_knn_logs_scores(tmp_path):
    cfg = compose_cfg("pretrain", *PRE_TINY, "trainer.max_steps=2", "eval=knn+linear",
                      "eval.synthetic_train_images=32", "eval.synthetic_val_images=16", "eval.num_workers=0",
                      "eval.linear_steps=20")
    pretrain(cfg, tmp_path)
    evals = [m for m in metrics(tmp_path) if "eval/knn_top1" in m]
    assert len(evals) == 1 and evals[0]["step"] == 2
    assert 0.0 <= evals[0]["eval/knn_top1"] <= 100.0 and "eval/linear_top1" in evals[0]


def test_finetune_resume_with_mixup_is_bit_identical(tmp_path):
    args = [*FT_TINY, "mixup.mixup=0.8", "mixup.cutmix=1.0", "model.drop_path_rate=0.2"]
    finetune(compose_cfg("finetune", *args, "trainer.max_steps=5"), tmp_path / "straight")
    finetune(compose_cfg("finetune", *args, "trainer.max_steps=3"), tmp_path / "split")
    finetune(compose_cfg("finetune", *args, "trainer.max_steps=5"), tmp_path / "split")
    a = load_checkpoint(tmp_path / "straight/checkpoints/last.pt")["model"]
    b = load_checkpoint(tmp_path / "split/checkpoints/last.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    vals = [m for m in metrics(tmp_path / "straight") if "val/top1" in m]
    # after epoch 1 (4 steps of 4 images) and at the stop (step 5)
    assert [m["step"] for m in vals] == [4, 5] and all(m["val/images"] == 8 for m in vals)


def test_finetune_refuses_a_different_init_in_the_same_run(tmp_path):
    model = create_fcmae("convnextv2_atto")
    torch.save({"model": model.state_dict()}, tmp_path / "ck.pt")
    finetune(compose_cfg("finetune", *FT_TINY, "trainer.max_steps=1", f"model.init_from={tmp_path / 'ck.pt'}"),
             tmp_path / "run")
    from fcmae.config import ConfigError
    with pytest.raises(ConfigError, match="model"):
        finetune(compose_cfg("finetune", *FT_TINY, "trainer.max_steps=2"), tmp_path / "run")


@pytest.mark.slow
def test_pretraining_learns_then_export_and_finetune_run(tmp_path):
    """A few hundred steps must bring the masked loss (fixed held-out batch and masks) well
    below its start and below predicting each patch's mean; the result then exports and
    fine-tunes end to end."""
    from fcmae.data import SyntheticImages, eval_transform
    from fcmae.models.masking import random_mask
    from fcmae.pretrain import build_model
    # 96 px: 3x3 patches, 4 visible; 64 px leaves too little context to show learning in 300 steps
    cfg = compose_cfg("pretrain", *PRE_TINY, "data.img_size=96", "trainer.max_steps=300", "trainer.epochs=100",
                      "optim.lr=2e-3", "trainer.log_every=50")
    src, tf = SyntheticImages(16, 8, 110, seed=99), eval_transform(96)
    imgs = torch.stack([tf(src[i][0]) for i in range(16)])
    mask = random_mask(16, 9, 0.5, generator=torch.Generator().manual_seed(0))

    def held_out_loss(model):
        model.eval()
        with torch.no_grad():
            return model(imgs, mask, visible_per_sample=4)[0].item()

    torch.manual_seed(cfg.trainer.seed)
    start = held_out_loss(build_model(cfg))  # the run builds the same initial weights from the seed
    pretrain(cfg, tmp_path / "pre")
    model = build_model(cfg)
    model.load_state_dict(load_checkpoint(tmp_path / "pre/checkpoints/last.pt")["model"])
    end = held_out_loss(model)
    # Per-patch normalised targets: predicting each patch's own mean scores its (n-1)/n-scaled variance, ~1.
    mean_pred = model.forward_loss(imgs, torch.zeros(16, 3072, 3, 3), mask).item()
    assert mean_pred == pytest.approx(1.0, abs=0.01)
    assert end < 0.75 * start and end < 0.75 * mean_pred, (start, end, mean_pred)

    out = export(tmp_path / "pre", "timm", tmp_path / "atto.safetensors", log=lambda *_: None)
    finetune(compose_cfg("finetune", *FT_TINY, "trainer.max_steps=4", f"model.init_from={out}"), tmp_path / "ft")
    vals = [m for m in metrics(tmp_path / "ft") if "val/top1" in m]
    assert vals and vals[-1]["step"] == 4
    import timm
    clf = timm.create_model("convnextv2_atto", num_classes=8)
    clf.load_state_dict(load_checkpoint(tmp_path / "ft/checkpoints/last.pt")["model"])  # strict: plain timm

"""Fine-tuning and evaluation: loading exports into the classifier, k-NN and linear-probe
scores against brute force and against an independent feature path, the fine-tune app's
resume and init checks. (Layer decay and the recipe: test_recipe.py; learning on real
images: test_real_images.py.)"""
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from fcmae import create_fcmae
from fcmae.storage.checkpoint import load_checkpoint
from fcmae.storage.weights_file import CheckpointError
from fcmae.evaluation import knn_accuracy, linear_probe_accuracy
from fcmae.export.exporter import export
from fcmae.finetune import build_classifier, load_pretrained
from fcmae.finetune import run as finetune
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
            assert rel_err(clf.forward_features(imgs), model.encoder.forward_unmasked(imgs)) < 1e-5
        assert torch.equal(clf.head.fc.weight, head_before)  # the head stays fresh
    with pytest.raises(CheckpointError, match="holds convnextv2_atto weights but model.name=convnextv2_femto"):
        load_pretrained(build_classifier("convnextv2_femto", 5, 0.0, 1.0), "convnextv2_femto", exported)


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


def test_pretrain_eval_scores_equal_an_independent_recomputation(tmp_path):
    """The k-NN / linear-probe scores logged during pretraining equal the same scorers run on
    features from another path: the run's checkpoint exported to timm, pooled forward_features."""
    import timm
    from fcmae.data.transforms import eval_transform
    from fcmae.data.sources import labelled_source
    cfg = compose_cfg("pretrain", *PRE_TINY, "trainer.max_steps=2", "eval=knn+linear",
                      "eval.synthetic_train_images=32", "eval.synthetic_val_images=16", "eval.num_workers=0",
                      "eval.linear_steps=20")
    pretrain(cfg, tmp_path)
    evals = [m for m in metrics(tmp_path) if "eval/knn_top1" in m]
    assert len(evals) == 1 and evals[0]["step"] == 2
    out = export(tmp_path, "timm", tmp_path / "atto.safetensors", log=lambda *_: None)
    clf = timm.create_model("convnextv2_atto", num_classes=0)
    from safetensors.torch import load_file
    clf.load_state_dict(load_file(out), strict=False)
    clf.eval()
    tf = eval_transform(64)
    feats = []
    for split, n in (("train", 32), ("val", 16)):
        src = labelled_source("synthetic", None, split, n, cfg.data.synthetic_classes, 64, cfg.trainer.seed)
        x = torch.stack([tf(src[i][0]) for i in range(n)])
        with torch.no_grad():
            feats += [clf.forward_features(x).mean((2, 3)), torch.arange(n) % cfg.data.synthetic_classes]
    knn = knn_accuracy(*feats, cfg.data.synthetic_classes, k=cfg.eval.k, temperature=cfg.eval.temperature)
    lin = linear_probe_accuracy(*feats, cfg.data.synthetic_classes, steps=20, seed=cfg.trainer.seed)
    one_image = 100 / 16 + 1e-6  # float noise between the two paths may flip at most a tie
    assert abs(evals[0]["eval/knn_top1"] - knn["knn_top1"]) <= one_image, (evals[0], knn)
    assert abs(evals[0]["eval/linear_top1"] - lin["linear_top1"]) <= one_image, (evals[0], lin)


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
def test_the_fine_tune_demo_config_learns(tmp_path):
    """The demo's own settings (conf/finetune.yaml, no experiment) from random init, cut at step 64
    of its 160: its 8 synthetic classes must leave chance (12.5%) far behind (about 80% there, the
    README's curve; with the official augmentation it stayed at chance for the whole schedule)."""
    from fcmae.finetune import run as finetune_run
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base=None):
        cfg = compose("finetune", overrides=["trainer.max_steps=64", "data.num_workers=0", "trainer.progress=log",
                                             "eval_every=100"])
    finetune_run(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if "val/top1" in r][-1]
    assert final["step"] == 64 and final["val/top1"] >= 40.0, final


@pytest.mark.slow
def test_the_fine_tune_demo_learns_from_the_pretraining_demo(tmp_path):
    """The README's chain at half length: the pretraining demo on half its images (96 steps, same
    schedule shape), exported, then the fine-tune demo from that export cut at step 96. The
    synthetic classes once buried their cue under colour noise and this stayed at chance (15.6%
    after the full 160 steps) while random init learned; the full chain reaches ~82% at step 64 (the
    README's curve), where this cuts the fine-tuning."""
    from fcmae.finetune import run as finetune_run
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base=None):
        pre_cfg = compose("pretrain", overrides=["data.synthetic_images=768", "data.num_workers=0",
                                                 "trainer.progress=log"])
        pretrain(pre_cfg, tmp_path / "pretrain")
        export(tmp_path / "pretrain", "timm", tmp_path / "atto.safetensors")
        ft_cfg = compose("finetune", overrides=["trainer.max_steps=64", "data.num_workers=0", "trainer.progress=log",
                                                f"model.init_from={tmp_path / 'atto.safetensors'}"])
    finetune_run(ft_cfg, tmp_path / "finetune")
    final = [r for r in metrics(tmp_path / "finetune") if "val/top1" in r][-1]
    assert final["step"] == 64 and final["val/top1"] >= 40.0, final

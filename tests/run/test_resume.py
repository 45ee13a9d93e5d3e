"""A resume that does what it says (issue 47): every key of both apps has one rule
(:mod:`fcmae.config.resume_rules`); a refused command changes nothing in the run directory; a
``resume=PATH`` of another run never rolls this one back; settings said to apply are in the optimizer
and in the next checkpoint; the input description is part of what a resume checks."""
import dataclasses
import hashlib
import logging
import os
from pathlib import Path

import pytest
import torch

from fcmae.config import ConfigError, FinetuneConfig, PretrainConfig
from fcmae.config.resume_rules import RULES, TABLES, rule_of
from fcmae.pretrain import run
from fcmae.run.resume import load_optimizer_state
from fcmae.storage.checkpoint import load_checkpoint
from fcmae.storage.run_lock import LOCK_FILE

from test_pretrain import make_cfg, metrics

KEEP = ["trainer.ckpt_every=2", "trainer.keep_checkpoints=20"]


def schema_keys(schema) -> list[str]:
    """Every leaf key of a structured config (``a.b``)."""
    out = []
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out += [f"{f.name}.{k}" for k in schema_keys(type(default))]
        else:
            out.append(f.name)
    return out


@pytest.mark.parametrize("app, schema", [("pretrain", PretrainConfig), ("finetune", FinetuneConfig)])
def test_every_key_of_both_apps_has_a_resume_rule(app, schema):
    keys = schema_keys(schema)
    assert len(keys) > 60 and "optim.weight_decay" in keys
    unclassified = [k for k in keys if rule_of(TABLES[app], k) is None]
    assert not unclassified, f"{app}: classify these in fcmae/config/resume_rules.py: {unclassified}"
    assert {rule_of(TABLES[app], k) for k in keys} <= set(RULES)
    # the rules of the settings this issue was about
    for key, rule in {"trainer.seed": "refuse", "optim.weight_decay": "apply", "optim.betas": "apply",
                      "data.mean": "input", "data.bands": "input", "data.channels": "input"}.items():
        assert rule_of(TABLES[app], key) == rule, key


def snapshot(run_dir: Path) -> dict:
    """Every path under a run directory with its link target or the hash of its bytes. The lock file is left
    out: it names the last process that held the directory (its holder line is rewritten by design)."""
    out = {}
    for p in sorted(run_dir.rglob("*")):
        rel = p.relative_to(run_dir).as_posix()
        if rel == LOCK_FILE:
            continue
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def test_a_refused_resume_path_leaves_the_run_as_it_was_and_auto_continues_from_its_newest_step(tmp_path):
    """Reproduced before: a refused ``resume=PATH`` had set checkpoints 4-6 aside, pointed last.pt at 3 and
    cut the metrics, so the next plain start continued from step 3 without a word."""
    run_dir = tmp_path / "run"
    run(make_cfg(*KEEP, "trainer.max_steps=6"), run_dir)
    ckdir = run_dir / "checkpoints"
    before = snapshot(run_dir)
    assert "checkpoints/checkpoint-0000006.pt" in before
    back = f"resume={ckdir / 'checkpoint-0000002.pt'}"
    with pytest.raises(ConfigError, match=r"trainer.seed: 0 -> 7"):
        run(make_cfg(*KEEP, "trainer.max_steps=6", back, "trainer.seed=7"), run_dir)
    assert snapshot(run_dir) == before
    # a checkpoint of another model's run: refused, and this run is not touched either
    other = tmp_path / "other"
    run(make_cfg(*KEEP, "trainer.max_steps=2", "model.decoder_embed_dim=16"), other)
    with pytest.raises(ConfigError, match=r"another run directory .*holds checkpoints of its own \(up to step 6\)"):
        run(make_cfg(*KEEP, "trainer.max_steps=8", f"resume={other / 'checkpoints' / 'checkpoint-0000002.pt'}"),
            run_dir)
    assert snapshot(run_dir) == before
    # the next plain start continues from step 6, with every metrics line of steps 1-6 still there
    assert run(make_cfg(*KEEP, "trainer.max_steps=7"), run_dir).step == 7
    assert [m["step"] for m in metrics(run_dir) if "loss" in m] == [1, 2, 3, 4, 5, 6, 7]
    assert load_checkpoint(ckdir / "last.pt")["step"] == 7


def test_resume_path_of_another_run_starts_an_empty_run_from_it_and_a_rerun_follows_the_new_timeline(tmp_path):
    source, branch = tmp_path / "source", tmp_path / "branch"
    run(make_cfg(*KEEP, "trainer.max_steps=4"), source)
    before = snapshot(source)
    start = f"resume={source / 'checkpoints' / 'checkpoint-0000002.pt'}"
    assert run(make_cfg(*KEEP, "trainer.max_steps=3", start), branch).step == 3
    assert snapshot(source) == before  # the source run is only read
    assert load_checkpoint(branch / "checkpoints/last.pt")["step"] == 3
    # the same command again (a requeue) continues the branch's own timeline
    assert run(make_cfg(*KEEP, "trainer.max_steps=4", start), branch).step == 4
    assert [m["step"] for m in metrics(branch) if "loss" in m] == [3, 4]


def test_settings_said_to_apply_are_in_the_optimizer_and_the_next_checkpoint(tmp_path, caplog):
    """Reproduced before: the warning said weight decay 0.05 -> 0.3 was in effect, and the next checkpoint's
    optimizer still held 0.05 (``optimizer.load_state_dict`` restores every group's values)."""
    run(make_cfg(*KEEP, "trainer.max_steps=2", "optim.weight_decay=0.05"), tmp_path)
    moments = load_checkpoint(tmp_path / "checkpoints/last.pt")["optimizer"]["state"]
    seen = {}

    def look(loop):
        seen.setdefault("groups", [dict((k, v) for k, v in g.items() if k != "params")
                                   for g in loop.optimizer.param_groups])
        seen.setdefault("steps", [float(s["step"]) for s in loop.optimizer.state.values()])
    with caplog.at_level(logging.WARNING, logger="fcmae"):
        run(make_cfg(*KEEP, "trainer.max_steps=3", "optim.weight_decay=0.3", "optim.betas=[0.8,0.9]",
                     "optim.clip_grad=1.0"), tmp_path, callbacks=[look])
    assert "optim.weight_decay: 0.05 -> 0.3" in caplog.text and "optim.betas: [0.9, 0.95] -> [0.8, 0.9]" in caplog.text
    decayed, skipped = seen["groups"]
    assert decayed["weight_decay"] == 0.3 and skipped["weight_decay"] == 0.0
    assert tuple(decayed["betas"]) == (0.8, 0.9) == tuple(skipped["betas"])
    assert set(seen["steps"]) == {3.0}  # the moments came along: AdamW's step count went on from 2
    assert len(moments) == len(seen["steps"])
    saved = load_checkpoint(tmp_path / "checkpoints/last.pt")
    assert saved["step"] == 3
    assert [g["weight_decay"] for g in saved["optimizer"]["param_groups"]] == [0.3, 0.0]
    assert [tuple(g["betas"]) for g in saved["optimizer"]["param_groups"]] == [(0.8, 0.9)] * 2
    assert saved["config"]["optim"]["clip_grad"] == 1.0


def test_optimizer_moments_follow_their_parameters_into_other_groups():
    """Another ``optim.layer_decay`` regroups the parameters: the moments go with each parameter, the
    group values (lr_scale, weight decay) are the new config's."""
    from fcmae.finetune import build_classifier
    from fcmae.optim import adamw, layer_decay_groups

    model = build_classifier("convnextv2_atto", 4, 0.0, 1.0)
    depths = [len(s.blocks) for s in model.stages]

    def build(layer_decay, weight_decay=0.05):
        return adamw(layer_decay_groups(model, weight_decay, layer_decay, "single", depths), 1e-3, (0.9, 0.999), False)
    old = build(1.0)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    old.step()
    saved = old.state_dict()
    new = build(0.75, weight_decay=0.1)
    assert len(new.param_groups) != len(old.param_groups)
    load_optimizer_state(new, saved, lambda: build(1.0))
    for p in model.parameters():
        assert torch.equal(new.state[p]["exp_avg"], old.state[p]["exp_avg"])
        assert torch.equal(new.state[p]["exp_avg_sq"], old.state[p]["exp_avg_sq"])
    scales = sorted({g["lr_scale"] for g in new.param_groups})
    assert scales[0] < 0.1 and scales[-1] == 1.0
    assert {g["weight_decay"] for g in new.param_groups} == {0.1, 0.0}
    with pytest.raises(ConfigError, match="does not fit this run's parameter groups"):
        load_optimizer_state(build(0.75), saved, None)  # no way to know the saved grouping: said, not guessed


def test_a_changed_normalisation_is_refused_and_one_resolved_by_the_run_is_said(tmp_path, caplog):
    run(make_cfg("trainer.max_steps=2"), tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"data.mean: \[0.485, 0.456, 0.406\] -> \[0.5, 0.5, 0.5\].*every input"):
        run(make_cfg("trainer.max_steps=3", "data.mean=[0.5,0.5,0.5]"), tmp_path)
    with pytest.raises(ConfigError, match=r"data.channels: rgb -> grey"):
        run(make_cfg("trainer.max_steps=3", "data.channels=grey", "model.in_chans=1", "data.mean=[0.5]",
                     "data.std=[0.2]"), tmp_path)
    assert snapshot(tmp_path) == before
    with caplog.at_level(logging.WARNING, logger="fcmae"):  # auto: computed, compared once resolved, said
        assert run(make_cfg("trainer.max_steps=3", "data.mean=auto", "data.std=auto", "data.stats_images=8"),
                   tmp_path).step == 3
    assert "the normalisation this run resolved differs from the checkpoint's (data.mean: [0.485" in caplog.text


def test_a_fine_tuning_rollback_sets_a_later_best_pt_aside_with_the_rest(tmp_path):
    from fcmae.finetune import run as finetune
    from test_finetune import FT_TINY, compose_cfg

    ckdir = tmp_path / "checkpoints"
    finetune(compose_cfg("finetune", *FT_TINY, *KEEP, "trainer.max_steps=6"), tmp_path)
    assert load_checkpoint(ckdir / "best.pt")["step"] > 2
    finetune(compose_cfg("finetune", *FT_TINY, *KEEP, "trainer.max_steps=3",
                         f"resume={ckdir / 'checkpoint-0000002.pt'}"), tmp_path)
    assert (ckdir / "best.pt.abandoned").is_file() and (ckdir / "checkpoint-0000006.pt.abandoned").is_file()
    assert not (ckdir / "best.pt").exists() or load_checkpoint(ckdir / "best.pt")["step"] <= 3

"""What a resume does with each config key that differs from the checkpoint's: the one table both apps
and :mod:`fcmae.run.resume_checks` read (``tests/run/test_resume.py`` walks both schemas: a key without
a rule fails it).

- ``refuse``: the key gives the checkpoint's numbers their meaning (the model, the input the weights were
  trained on, the seed behind the data order and the masks of the epoch under way): refused, naming it;
- ``batch``: the effective batch; kept by the accumulation where only the batch size (or the world size)
  changed, else refused;
- ``data``: where the training images are; checked against the checkpoint's image count once the data is
  read (another folder with another count is another dataset);
- ``input``: how a file becomes the input (normalisation, bands, channels): refused when given; a value
  the run resolves itself (``data.mean=auto``, fine-tuning's null = from ``model.init_from``) is compared
  once resolved, and a difference is said;
- ``apply``: a training setting (lr, schedule, weight decay, betas, layer decay, clipping, augmentation):
  taken from the checkpoint's step on and said; the optimizer's per-group values are the new config's,
  set after its moments load (:func:`fcmae.run.resume.load_optimizer_state`);
- ``free``: how the run is fed, logged, launched, checkpointed or monitored: taken without a word.
"""
from __future__ import annotations

REFUSE, BATCH, DATA, INPUT, APPLY, FREE = "refuse", "batch", "data", "input", "apply", "free"
RULES = (REFUSE, BATCH, DATA, INPUT, APPLY, FREE)

_COMMON = {
    "data.img_size": REFUSE, "data.batch_size": BATCH, "data.num_workers": FREE, "data.pin_memory": FREE,
    "data.persistent_workers": FREE, "data.synthetic_classes": REFUSE, "data.hflip": APPLY,
    "data.mean": INPUT, "data.std": INPUT, "data.channels": INPUT, "data.bands": INPUT, "data.npy_layout": INPUT,
    "data.max_bad_fraction": FREE, "data.read_timeout": FREE, "data.source": REFUSE, "data.crop_scale": APPLY,
    "data.synthetic_images": REFUSE,
    "optim.name": REFUSE, "optim.blr": APPLY, "optim.lr": APPLY, "optim.min_lr": APPLY, "optim.weight_decay": APPLY,
    "optim.betas": APPLY, "optim.effective_batch_size": BATCH, "optim.clip_grad": APPLY,
    "schedule.name": REFUSE, "schedule.warmup_epochs": APPLY, "schedule.warmup_steps": APPLY,
    "trainer.epochs": APPLY, "trainer.max_steps": FREE, "trainer.accum_iter": BATCH, "trainer.precision": APPLY,
    "trainer.device": FREE, "trainer.compile": FREE, "trainer.seed": REFUSE, "trainer.log_every": FREE,
    "trainer.vis_every": FREE, "trainer.ckpt_every": FREE, "trainer.keep_checkpoints": FREE,
    "trainer.progress": FREE, "trainer.divergence_stop": FREE,
    "trainer.activation_checkpointing": FREE,  # the same gradients, recomputed
    "trainer.memory_plan": FREE,
    "logger.*": FREE, "launcher.*": FREE,
    "run_name": FREE, "resume": FREE, "eval_only": FREE,
}

PRETRAIN = {
    **_COMMON,
    "model.*": REFUSE,  # the architecture, the mask ratio and drop path: what the weights were trained as
    "encoder.backend": REFUSE, "encoder.grn_stats": REFUSE,
    "encoder.dwconv": FREE,  # another kernel for the same arithmetic
    "data.root": DATA, "data.stats_images": FREE, "data.decode": FREE,
    "optim.decay_grn_and_mask_token": APPLY,
    "init_from": REFUSE,
    "eval.*": FREE, "vis.*": FREE,  # the monitor and the pictures, not the training
}

FINETUNE = {
    **_COMMON,
    "model.name": REFUSE, "model.num_classes": REFUSE, "model.drop_path_rate": REFUSE,
    "model.head_init_scale": REFUSE, "model.in_chans": REFUSE, "model.init_from": REFUSE, "model.patch_size": REFUSE,
    "data.train_root": DATA, "data.val_root": APPLY, "data.labels_per_class": REFUSE, "data.labels_seed": REFUSE,
    "data.val_per_class": APPLY, "data.synthetic_val_images": APPLY, "data.auto_augment": APPLY,
    "data.color_jitter": APPLY, "data.interpolation": APPLY, "data.re_prob": APPLY, "data.re_mode": APPLY,
    "data.re_count": APPLY, "data.crop_pct": APPLY,
    "optim.layer_decay": APPLY, "optim.layer_decay_type": APPLY,
    "mixup.*": APPLY,
    "ema.enabled": REFUSE,  # the EMA weights exist or not
    "ema.decay": APPLY, "ema.eval": APPLY,
    "eval_every": FREE,
}

TABLES = {"pretrain": PRETRAIN, "finetune": FINETUNE}


def rule_of(table: dict, key: str) -> str | None:
    """The rule for ``key`` (``a.b``): its own entry, else its group's (``a.*``); None: unclassified."""
    if key in table:
        return table[key]
    return table.get(key.split(".", 1)[0] + ".*") if "." in key else None


def keys_with(table: dict, rule: str, keys) -> list[str]:
    """Those of ``keys`` that ``table`` gives ``rule``."""
    return [k for k in keys if rule_of(table, k) == rule]

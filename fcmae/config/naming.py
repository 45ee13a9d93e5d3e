"""What a run directory is called: the keys that name a run (and the ones that do not), directory
names that stay short, safe to pass back in an override and stable for resume, and the Hydra
resolvers the app configs use for them."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

# What a run directory's name holds. Every key that changes the trained weights names it (through
# run_name or Hydra's override_dirname); the keys below do not, so the same command with one of them
# changed continues the same run. conf/<app>.yaml's hydra exclude_keys must list exactly these plus
# the config groups (tests/config/test_run_names.py walks the schemas: a new key must be classified here).
UNTRAINED_KEYS = frozenset({
    # where and how often things are written, logged, launched, evaluated; how data is fed
    "trainer.max_steps", "trainer.device", "trainer.compile", "trainer.progress", "trainer.log_every",
    "trainer.vis_every", "trainer.ckpt_every", "trainer.keep_checkpoints", "trainer.divergence_stop", "trainer.activation_checkpointing", "trainer.memory_plan", "data.num_workers", "data.pin_memory",
    "data.persistent_workers", "data.max_bad_fraction", "data.read_timeout", "resume", "run_name", "eval_only",
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
MAX_LIST_IN_NAME = 4  # a longer list value (per-band data.mean/std) is named by its length and a hash
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


def _short_lists(overrides: str) -> str:
    """List values longer than MAX_LIST_IN_NAME become ``<n>values-<hash>``: twelve per-band means
    would fill the name and push the keys after them into the final hash."""
    import hashlib
    import re

    def shorten(m):
        items = m.group(1).split(",")
        if len(items) <= MAX_LIST_IN_NAME:
            return m.group(0)
        return f"={len(items)}values-{hashlib.sha1(m.group(1).encode()).hexdigest()[:8]}"
    return re.sub(r"=\[([^\]]*)\]", shorten, overrides)


def safe_dirname(overrides: str, short_lists: bool = True) -> str:
    """``model.mask_ratio=0.4,data.img_size=64`` -> ``model.mask_ratio:0.4+data.img_size:64``: a
    name that can be passed back to our own overrides unquoted (lists lose their brackets:
    ``data.crop_scale:0.35+1.0``; long ones are named by length and hash, :func:`_short_lists`)."""
    text = (_short_lists(overrides) if short_lists else overrides).replace("=", ":").replace(",", "+")
    return short_dirname(_safe("".join(ch for ch in text if ch not in "[](){}'\" ")))


def run_subdir(parent: str, overrides: str) -> str:
    """The run directory's last component under ``parent``: :func:`safe_dirname`, unless a run
    directory of an older naming (long lists in full; ``key=value,...``) exists there and the new
    one does not, in which case that one (so runs started before the naming changed still resume)."""
    new = safe_dirname(overrides)
    if (Path(parent) / new).exists():
        return new
    for old in (safe_dirname(overrides, short_lists=False), short_dirname(overrides)):
        if old != new and (Path(parent) / old).is_dir():
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


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("fcmae_init_tag"):
        OmegaConf.register_new_resolver("fcmae_init_tag", init_tag)
    if not OmegaConf.has_resolver("fcmae_init_suffix"):
        OmegaConf.register_new_resolver("fcmae_init_suffix", init_suffix)
    if not OmegaConf.has_resolver("fcmae_subdir"):
        OmegaConf.register_new_resolver("fcmae_subdir", run_subdir)

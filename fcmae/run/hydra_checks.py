"""A Hydra callback (``hydra.callbacks`` in the app configs) that runs before Hydra creates the run
directory: the config's range checks, the evaluation-only fine-tune's log place, a writable run
directory that no other run holds, so a bad value or place is one line and leaves no empty run
directory behind, and a refused run leaves the running one's ``.hydra/`` record as it was."""
from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback

from ..storage.run_lock import RunDirectoryBusy, RunDirectoryUnwritable, RunLock, check_writable


class RunDirectoryChecks(Callback):
    """A Hydra callback (``hydra.callbacks`` in the app configs) that runs before Hydra creates the
    run directory and opens its log file there: the config's range checks (``app``: pretrain or
    finetune), so that a bad value leaves no empty run directory; an evaluation-only fine-tune logs
    into the run it evaluates instead of a training directory named after it; and a read-only or
    unwritable place is one line rather than Hydra's "Unable to configure handler 'file'"."""

    def __init__(self, app: str = "pretrain"):
        self.app = app

    def on_run_start(self, config, **kwargs) -> None:
        self._validate(config)
        if config.get("eval_only"):
            from omegaconf import open_dict, read_write
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.output_subdir = None  # keep the evaluated run's own .hydra/ record as it is
            if self.app == "finetune" and config.model.get("init_from"):
                self._log_beside(config, str(config.model.init_from))
        self._check(config, "hydra.run.dir", lock=not config.get("eval_only"))

    def on_multirun_start(self, config, **kwargs) -> None:
        self._check(config, "hydra.sweep.dir")

    def _validate(self, config) -> None:
        import sys
        from omegaconf import OmegaConf
        from ..errors import ConfigError
        from .validation import validate, validate_finetune
        job = OmegaConf.masked_copy(config, [k for k in config.keys() if k != "hydra"])
        try:
            (validate_finetune if self.app == "finetune" else validate)(job)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)
        except Exception:  # anything else is the app's to report, with its context
            return

    @staticmethod
    def _log_beside(config, init_from: str) -> None:
        from omegaconf import open_dict, read_write
        from ..storage.checkpoint import run_checkpoint_dir
        target = Path(init_from)
        ck_dir = run_checkpoint_dir(target)
        where = ck_dir.parent if ck_dir is not None and ck_dir.name == "checkpoints" else \
            (target if target.is_dir() else target.parent)
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.run.dir = str(where)

    @staticmethod
    def _check(config, key: str, lock: bool = False) -> None:
        import sys
        from omegaconf import OmegaConf
        try:
            where = OmegaConf.select(config, key)
        except Exception:  # an interpolation only Hydra can resolve later: let Hydra report it
            return
        if not where:
            return
        try:
            if lock:  # a run refused by the lock must not rewrite the running run's .hydra/ record
                RunLock(where).check_free()
            check_writable(where)
        except (RunDirectoryUnwritable, RunDirectoryBusy) as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)

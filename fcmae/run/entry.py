"""The command-line door of every app: Hydra's ``@hydra.main`` around a run, user errors as one
line (exit 1), preemption as exit 128 + signal after its checkpoint, for the launcher to requeue."""
from __future__ import annotations

import logging
import sys
from typing import Callable

from omegaconf import DictConfig

from ..engine import Preempted, PreemptionGuard
from ..errors import UserError

log = logging.getLogger("fcmae")


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def print_submitit_warnings_once() -> None:
    """submitit's logger has a stdout handler for everything, a stderr one for warnings, and also
    passes its records on to the root logger's console handler (Hydra's): each warning (a failing
    ``sacct`` poll on a cluster without accounting) printed three times. One each, on stderr."""
    try:
        from submitit.core import logger as submitit_logger
    except Exception:  # submitit is the Slurm launcher's; without it there is nothing to fix
        return
    sub = submitit_logger.get_logger()
    sub.propagate = False
    for handler in sub.handlers:
        if getattr(handler, "stream", None) is sys.stdout and not any(isinstance(f, _BelowWarning) for f in handler.filters):
            handler.addFilter(_BelowWarning())


def hydra_entry(config_path: str, config_name: str, run: Callable[[DictConfig, str], object]) -> None:
    """``@hydra.main`` around ``run(cfg, run_dir)``: user errors exit 1 with one clear line;
    preemption exits 128+signal after its checkpoint, for the launcher to requeue."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    print_submitit_warnings_once()

    @hydra.main(config_path=config_path, config_name=config_name, version_base=None)
    def _main(cfg: DictConfig) -> None:
        try:
            with PreemptionGuard():  # from the start: a signal during setup stops the run after step 1
                run(cfg, HydraConfig.get().runtime.output_dir)
        except Preempted as exc:
            log.warning("%s; run the same command again to resume", exc)
            sys.exit(128 + int(exc.signum))
        except KeyboardInterrupt:
            from ..data.loaders import kill_workers
            kill_workers()  # they ignore SIGTERM, and a blocked one would hold up the exit
            log.warning("interrupted (a second signal): exiting without a checkpoint; the last one stands")
            sys.exit(130)
        except UserError as exc:
            log.error("%s", exc)
            sys.exit(1)

    _main()

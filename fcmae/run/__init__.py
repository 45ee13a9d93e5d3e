"""A training run, assembled in one place for every app: :func:`run_app` with an :class:`App`
(``fcmae.pretrain``, ``fcmae.finetune``); the resume decision (:mod:`.resume`), the rank agreement
(:mod:`.ranks`), the loop's settings (:mod:`.settings`), random streams (:mod:`.seeding`), initial
weights (:mod:`.init_weights`) and the Hydra door (:mod:`.entry`) each in a room of its own."""
from .assembly import App, RunData, run_app
from .entry import hydra_entry

__all__ = ["App", "RunData", "hydra_entry", "run_app"]

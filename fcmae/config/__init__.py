"""Configs of ``fcmae-pretrain`` and ``fcmae-finetune``: the schemas Hydra type-checks
(:mod:`.schemas`), what names a run directory (:mod:`.naming`), and range checks of the config's own
values (:mod:`.checks`; the checks of values other modules own live with them, and
:mod:`fcmae.run.validation` runs them all). Imports nothing above ``models``, ``sparse`` and ``optim``."""
from ..errors import ConfigError
from .naming import (FINETUNE_PATH_KEYS, FINETUNE_UNTRAINED_KEYS, MAX_DIRNAME, PRETRAIN_PATH_KEYS,
                     PRETRAIN_UNTRAINED_KEYS, UNTRAINED_KEYS, init_suffix, init_tag, register_resolvers, run_subdir,
                     safe_dirname, short_dirname)
from .schemas import (CONFIG_PATH, LABELLED_SOURCES, PRETRAIN_SOURCES, ROOTED_LABELLED, ClassifierConfig,
                      DataConfig, EmaConfig, EncoderConfig, EvalConfig, FinetuneConfig, FinetuneDataConfig,
                      FinetuneOptimConfig, ImageDataConfig, LauncherConfig, LoggerConfig, MixupConfig, ModelConfig,
                      OptimConfig, PretrainConfig, PretrainOptimConfig, ScheduleConfig, TrainerConfig, VisConfig,
                      store_schemas)


def register_configs() -> None:
    """The Hydra resolvers the app configs use and the schemas they extend."""
    register_resolvers()
    store_schemas()

__all__ = ["CONFIG_PATH", "ClassifierConfig", "ConfigError", "DataConfig", "EmaConfig", "EncoderConfig", "EvalConfig",
           "FINETUNE_PATH_KEYS", "FINETUNE_UNTRAINED_KEYS", "FinetuneConfig", "FinetuneDataConfig",
           "FinetuneOptimConfig", "ImageDataConfig", "LABELLED_SOURCES", "LauncherConfig", "LoggerConfig",
           "MAX_DIRNAME", "MixupConfig", "ModelConfig", "OptimConfig", "PRETRAIN_PATH_KEYS", "PRETRAIN_SOURCES",
           "PRETRAIN_UNTRAINED_KEYS", "PretrainConfig", "PretrainOptimConfig", "ROOTED_LABELLED", "ScheduleConfig",
           "TrainerConfig", "UNTRAINED_KEYS", "VisConfig", "init_suffix", "init_tag", "register_configs",
           "run_subdir", "safe_dirname", "short_dirname"]

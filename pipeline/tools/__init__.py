"""Command-line tools (data building, benchmarks) that sit beside the pipeline."""

from __future__ import annotations

from pipeline import CONF_DIR as CONF
from pipeline.data import DataConfig


def data_config(*overrides: str) -> DataConfig:
    """The ``data`` section of the real config (Hydra compose API), e.g. ``data_config("data.augment=false")``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return DataConfig(**OmegaConf.to_container(cfg.data, resolve=True))

"""A training run on photos kept anywhere fsspec reaches: ``corrdiff.trainer.train`` on the
images of ``config.data``. Imports neither Ray nor pyarrow: a lent GPU machine may have
neither (tests/test_device_train.py)."""

from __future__ import annotations

from pathlib import Path

from corrdiff.trainer import TrainConfig, train
from pipeline.image_folder import load_images


def run_train(config: TrainConfig) -> Path:
    """Train (or resume) the run ``config`` describes; returns the exported model's path.
    The photos are read inside the run's clock (``train`` calls the loader), each at least
    a crop a side."""
    return train(config, lambda: [image for _, image in load_images(config.data, config.crop,
                                                                     config.storage_options)])

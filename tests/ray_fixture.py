"""One small local Ray cluster per test session (starting one takes seconds)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray
from ray.data import DataContext


@pytest.fixture(scope="session")
def ray_local(s3_server) -> Iterator[None]:
    """A 2-CPU local cluster, started after s3_server so that its workers inherit the fake
    AWS credentials (workers copy the environment of the process that calls ray.init)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()

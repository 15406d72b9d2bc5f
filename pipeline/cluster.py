"""Joining a Ray cluster, the same way for every job."""

from __future__ import annotations

import os

import ray


def connect(address: str | None) -> None:
    """Join the cluster at ``address`` (or $RAY_ADDRESS, as ``ray job submit`` sets it);
    with neither, start an embedded local cluster sized to this machine. A process already
    connected (a notebook, a test, a job calling another) keeps its connection."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)

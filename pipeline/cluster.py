"""Joining a Ray cluster, the same way for every job, and what the jobs print while they run."""

from __future__ import annotations

import logging
import os
import sys

import ray
from ray.data import DataContext

# Seconds between progress lines when stdout is a log, not a terminal (Ray Data's default
# is every 10 s, each time one line per operator and more).
LOG_PROGRESS_EVERY_S = 30


def connect(address: str | None) -> None:
    """Join the cluster at ``address`` (or $RAY_ADDRESS, as ``ray job submit`` sets it);
    with neither, start an embedded local cluster sized to this machine. A process already
    connected (a notebook, a test, a job calling another) keeps its connection."""
    quiet_progress()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)


def quiet_progress() -> None:
    """Progress that says what matters: Ray Data's bars in a terminal; in a log (a file, a
    ``ray job`` log, cron mail) one total-progress line every :data:`LOG_PROGRESS_EVERY_S`
    seconds instead of a dozen lines every ten; Ray Data's per-dataset chatter (execution
    plans, log folders) only at DEBUG. Warnings and errors are untouched."""
    if sys.stdout.isatty():
        return
    os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", str(LOG_PROGRESS_EVERY_S))  # read when first used
    DataContext.get_current().enable_operator_progress_bars = False
    for name in ("ray.data._internal.execution.streaming_executor", "ray.data.dataset"):
        logging.getLogger(name).setLevel(logging.WARNING)
    progress = logging.getLogger("ray.data._internal.progress")
    if not any(isinstance(f, _ProgressNotices) for f in progress.filters):
        progress.addFilter(_ProgressNotices())


class _ProgressNotices(logging.Filter):
    """Drops Ray Data's notices about the progress display that :func:`quiet_progress` chose
    (one is a WARNING, which an operator would read as something to act on)."""

    NOTICES = ("Progress bars for operators disabled", "Progress will be logged because")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.NOTICES)

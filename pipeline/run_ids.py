"""Ids of runs: a compress job, an audit, a restore.

One form for every kind, so that ids sort by time and name the run in file names, logs and
archive rows alike: the UTC start to the second, then six hex digits against two runs
started in the same second.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone


def new_run_id() -> str:
    """``20261202T031702Z-1a2b3c``: when the run started (UTC), and a random suffix."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]

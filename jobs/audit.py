"""Audit a CorrDiff archive (a seeded sample scored against the originals, or --verify-all
for every record's integrity) and write a report: ``corrdiff-archive audit``.

Locally (starts an embedded Ray cluster):
    python jobs/audit.py --archive s3://bucket/archive/ --report s3://bucket/audits/
    python jobs/audit.py --archive ... --report ... --sample 1% --config configs/audit.yaml
    python jobs/audit.py --archive ... --report ... --verify-all

On a Ray cluster:
    ray job submit --runtime-env configs/ray-job.yaml -- python jobs/audit.py --archive ... --report ...

Settings: configs/audit.yaml (--config), then the flags (--help lists them; pipeline/cli.py).
Exit status: 0 all checks pass, 1 a check failed, 2 bad flags or config.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout, as `ray job submit` sends it

from pipeline.cli import command_main  # noqa: E402

if __name__ == "__main__":
    command_main("audit")

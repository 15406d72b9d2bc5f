"""Restore images (PNG) from a CorrDiff archive: ``corrdiff-archive restore``.

Locally (starts an embedded Ray cluster):
    python jobs/restore.py --archive s3://bucket/archive/ --output s3://bucket/restored/
    python jobs/restore.py --archive ... --output ... --keys photos/cat.jpg photos/dog.jpg
    python jobs/restore.py --archive ... --output ... --keys-file keys.txt --mode e2e

On a Ray cluster:
    ray job submit --runtime-env configs/ray-job.yaml -- python jobs/restore.py --archive ... --output ...

Settings: configs/restore.yaml (--config), then the flags (--help lists them; pipeline/cli.py).
Exits 0 when every selected key was restored, 1 otherwise, 2 on bad flags or config.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout, as `ray job submit` sends it

from pipeline.cli import command_main  # noqa: E402

if __name__ == "__main__":
    command_main("restore")

"""Compress an image collection into a CorrDiff Parquet archive: ``corrdiff-archive compress``.

Locally (starts an embedded Ray cluster):
    python jobs/compress.py --input s3://bucket/photos/ --output s3://bucket/archive/

On a Ray cluster:
    ray job submit --runtime-env configs/ray-job.yaml -- python jobs/compress.py --input ... --output ...

Settings: configs/compress.yaml (--config), then the flags (--help lists them; pipeline/cli.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout, as `ray job submit` sends it

from pipeline.cli import command_main  # noqa: E402

if __name__ == "__main__":
    command_main("compress")

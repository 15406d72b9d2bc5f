"""Train a CorrDiff model through its three phases, resumably, and export it:
``corrdiff-archive train``.

    python jobs/train.py --config configs/train/photo-0.3.yaml [--data URL] [--output DIR]
        [--max-seconds S] [--lpips optional] [--checkpoint-seconds 60 --export-checkpoints]

Rerunning the same command resumes from OUTPUT/checkpoint.pt (corrdiff/trainer.py);
docs/training.md says how the shipped models were trained.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, as on a lent GPU

from pipeline.cli import command_main  # noqa: E402

if __name__ == "__main__":
    command_main("train")

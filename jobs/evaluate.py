"""Evaluate a CorrDiff model against JPEG, WebP and AVIF at the same rate, image by image:
``corrdiff-archive evaluate``.

    python jobs/evaluate.py --images DIR_OR_URL --model NAME_OR_PATH [--output DIR]
        [--modes corrdiff,e2e,diffusion] [--baselines jpeg,webp,avif] [--device cpu]
        [--curve-qualities 5,10,20,30,40,50,60,70,80,90] [--gamma-refine-steps N [--gamma-lr LR]
        [--gamma-metric lpips-alex|lpips-vgg|dists]] [--config configs/evaluate.yaml]

Writes eval.json, eval.md and rate_quality.png (pipeline/evaluate.py); what is measured and
how: corrdiff/evaluation.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout, run as a script

from pipeline.cli import command_main  # noqa: E402

if __name__ == "__main__":
    command_main("evaluate")

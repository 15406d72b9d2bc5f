"""Train a CorrDiff model through its three phases, resumably, and export it.

    python jobs/train.py --config configs/train/photo-0.3.yaml [--data URL] [--output DIR]
        [--max-seconds S] [--lpips optional] [--checkpoint-seconds 60 --export-checkpoints]

Rerunning the same command resumes from OUTPUT/checkpoint.pt. The loop, its checkpoints,
log and time budget are described in corrdiff/trainer.py; docs/training.md says how the
shipped models were trained.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout, as on a lent GPU

from corrdiff.trainer import TrainConfig, train  # noqa: E402
from pipeline.image_folder import load_images  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML training config (configs/train/)")
    parser.add_argument("--data", help="fsspec URL of a folder of training photos (overrides the config)")
    parser.add_argument("--output", help="directory for checkpoint, log and model (overrides the config)")
    parser.add_argument("--device", help="cpu, cuda, or auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--max-seconds", type=float, help="wall-clock budget, split between the phases")
    parser.add_argument("--checkpoint-seconds", type=float, help="also checkpoint this often (seconds)")
    parser.add_argument("--export-checkpoints", action="store_true", default=None,
                        help="write the loadable model at every checkpoint too")
    parser.add_argument("--max-file-mib", type=float, help="largest file to write (MiB)")
    parser.add_argument("--lpips", choices=["required", "optional"], help="optional: skip phases that need it if absent")
    args = parser.parse_args(argv)
    config = TrainConfig.from_yaml(args.config, {
        "data": args.data, "output": args.output, "device": args.device, "threads": args.threads,
        "max_seconds": args.max_seconds, "checkpoint_seconds": args.checkpoint_seconds,
        "export_checkpoints": args.export_checkpoints, "max_file_mib": args.max_file_mib, "lpips": args.lpips})
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    model_path = train(config, lambda: [image for _, image in load_images(config.data, config.crop,
                                                                           config.storage_options)])
    print(f"model written to {model_path}")
    return model_path


if __name__ == "__main__":
    main()

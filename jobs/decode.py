"""Restore images (PNG) from a CorrDiff archive: every key, or the keys you name.

Locally (starts an embedded Ray cluster):
    python jobs/decode.py --archive s3://bucket/archive/ --output s3://bucket/restored/
    python jobs/decode.py --archive ... --output ... --keys photos/cat.jpg photos/dog.jpg
    python jobs/decode.py --archive ... --output ... --keys-file keys.txt --mode e2e

On a Ray cluster:
    ray job submit --working-dir . -- python jobs/decode.py --archive ... --output ...

Each key K is written as OUTPUT/K.png (folders kept; unsafe keys percent-encoded, see
pipeline/keys.py). OUTPUT/_restore/<run>.parquet maps every key to its file or to the
reason it was not restored. Each record is decoded by the model whose id it carries, found
in the archive's own _models/, then among the package's models, then in the stores named
by --model-store (prefixes of <model id>.safetensors), unless --model names one.
Exits 0 when every selected key was restored, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from corrdiff import DECODE_MODES  # noqa: E402
from pipeline.cluster import connect  # noqa: E402
from pipeline.decode import DecodeConfig, run_decode  # noqa: E402
from pipeline.resources import ResourceSettings  # noqa: E402
from pipeline.storage import StorageConfig  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", required=True, help="fsspec URL of the archive")
    parser.add_argument("--output", required=True, help="fsspec URL of the folder/prefix for the PNG files")
    parser.add_argument("--keys", nargs="+", help="restore only these keys")
    parser.add_argument("--keys-file", help="restore only the keys in this file, one per line ('-' = stdin)")
    parser.add_argument("--mode", choices=DECODE_MODES, default="corrdiff",
                        help="corrdiff (default: the archived quality), e2e (fastest), diffusion")
    parser.add_argument("--model", help="decode every record with this model (default: each record's own)")
    parser.add_argument("--model-store", action="append", default=[], metavar="URL",
                        help="also look for models here (fsspec prefix of <model id>.safetensors; repeatable)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--config", help="YAML with storage:, resources: and model_stores: (as configs/audit.yaml)")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (credentials from the environment)")
    parser.add_argument("--run-id", help="name of this run's manifest (default: time + random suffix)")
    parser.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else a local cluster)")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> DecodeConfig:
    data = (yaml.safe_load(Path(args.config).read_text()) or {}) if args.config else {}
    storage = dict(data.get("storage") or {})
    if args.endpoint_url:
        storage["endpoint_url"] = args.endpoint_url
    keys = list(args.keys or [])
    if args.keys_file:
        text = sys.stdin.read() if args.keys_file == "-" else Path(args.keys_file).read_text()
        keys += [line for line in text.splitlines() if line]
    return DecodeConfig(
        archive=args.archive, output=args.output, keys=tuple(keys) if (args.keys or args.keys_file) else None,
        mode=args.mode, model=args.model, model_stores=(*(data.get("model_stores") or ()), *args.model_store),
        device=args.device, storage=StorageConfig(**storage),
        resources=ResourceSettings(**(data.get("resources") or {})), run_id=args.run_id,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = build_config(args)
    connect(args.ray_address)
    summary = run_decode(config)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    return 0 if summary["restored"] == summary["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())

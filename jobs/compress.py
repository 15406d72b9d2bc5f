"""Compress an image collection into a CorrDiff Parquet archive.

Locally (starts an embedded Ray cluster):
    python jobs/compress.py --input s3://bucket/photos/ --output s3://bucket/archive/

On a Ray cluster:
    ray job submit --working-dir . -- python jobs/compress.py --input ... --output ...

Settings come from the embedded defaults, then --config FILE (YAML, see
configs/compress.yaml), then the flags. Rerunning the same command resumes: keys already
in the archive are skipped. Prints a summary and writes it as _summary.json in the archive.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cluster import connect  # noqa: E402
from pipeline.compress import CompressConfig, run_compress  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="fsspec URL of the images: a folder/prefix, or a manifest file")
    parser.add_argument("--output", help="fsspec URL of the archive (a folder/prefix of Parquet files)")
    parser.add_argument("--config", help="YAML config file (configs/compress.yaml documents every key)")
    parser.add_argument("--input-kind", choices=["files", "tar", "parquet", "manifest"], help="layout of --input")
    parser.add_argument("--model", help="bundled model name or weights file (default: the default model)")
    parser.add_argument("--device", help="auto, cpu or cuda")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (credentials from the environment)")
    parser.add_argument("--job-id", help="id recorded in every row (default: time + random suffix)")
    parser.add_argument("--allow-config-change", action="store_true", default=None,
                        help="resume an archive whose rows were made with another model, floor, steps or seed")
    parser.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else a local cluster)")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> CompressConfig:
    data: dict = yaml.safe_load(Path(args.config).read_text()) if args.config else {}
    data = data or {}
    data.setdefault("input", {})
    for flag, section, key in [("input", "input", "url"), ("input_kind", "input", "kind"),
                               ("model", "codec", "model"), ("device", "codec", "device"),
                               ("endpoint_url", "storage", "endpoint_url")]:
        if getattr(args, flag) is not None:
            data.setdefault(section, {})[key] = getattr(args, flag)
    if args.output is not None:
        data["output"] = args.output
    if args.job_id is not None:
        data["job_id"] = args.job_id
    if args.allow_config_change:
        data["allow_config_change"] = True
    if not data["input"].get("url") or not data.get("output"):
        raise SystemExit("compress: --input and --output are required (or input.url and output in --config)")
    return CompressConfig.from_dict(data)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    config = build_config(args)
    connect(args.ray_address)
    summary = run_compress(config)
    print(format_summary(summary))
    return summary


def format_summary(summary: dict) -> str:
    lines = [
        f"archive        {summary['archive']}",
        f"job            {summary['job_id']}",
        f"images         {summary['rows']} ({summary['ok']} ok, {summary['errors']} errors)"
        + ("" if summary["rows"] == summary["unique_keys"] else f"  WARNING: {summary['rows'] - summary['unique_keys']} duplicate keys"),
        f"bytes          {summary['input_bytes']:,} in -> {summary['archive_bytes']:,} archived"
        + (f" ({summary['compression_ratio']}x)" if summary["compression_ratio"] else ""),
        (f"bpp            {summary['bpp']:.4f} (all bits / all pixels; per image: median "
         f"{summary['bpp_per_image']['median']:.4f}, 5-95% {summary['bpp_per_image']['p5']:.4f}-"
         f"{summary['bpp_per_image']['p95']:.4f})") if summary["bpp"] is not None else "bpp            -",
        f"this run       {summary['processed_this_job']} images in {summary['seconds']} s"
        + (f" ({summary['images_per_second']} images/s)" if summary["images_per_second"] else ""),
    ]
    if summary["fallback_share"]:
        lines.append("codecs         " + ", ".join(f"{codec} {n}" for codec, n in summary["codecs"].items())
                     + f" (fallback share {summary['fallback_share']:.1%}: images that met the floor only so)")
    for model_id, model in summary["models"].items():
        lines.append(f"model          {model_id}: {model['records']} records, "
                     + (f"weights in {model['file']}" if model["file"] else
                        "WARNING: no copy in the archive's _models/ (decoding needs the package or a model store)"))
    skipped = summary["skipped_this_job"]
    if skipped["count"]:
        lines.append(f"skipped        {skipped['count']} files or tar members without an image extension: " + "; ".join(
            f"{extension or '(none)'} {entry['count']} (e.g. {', '.join(entry['examples'])})"
            for extension, entry in skipped["by_extension"].items()))
    if summary["error_reasons"]:
        lines.append("error reasons  " + json.dumps(summary["error_reasons"]))
    if summary["retryable_errors"]:
        lines.append(f"retryable      {summary['retryable_errors']} error rows failed for a passing reason "
                     "(storage, memory): run the same command again to retry them")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

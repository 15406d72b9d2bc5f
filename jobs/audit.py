"""Audit a CorrDiff archive's quality (a seeded sample, scored against the originals), or
verify every record's integrity; write a report; exit non-zero when a threshold is breached.

Locally (starts an embedded Ray cluster):
    python jobs/audit.py --archive s3://bucket/archive/ --report s3://bucket/audits/
    python jobs/audit.py --archive ... --report ... --sample 1% --config configs/audit.yaml
    python jobs/audit.py --archive ... --report ... --verify-all

On a Ray cluster:
    ray job submit --working-dir . -- python jobs/audit.py --archive ... --report ...

Each run writes REPORT/<audit id>/report.html (self-contained), summary.json and
metrics.parquet, and REPORT/latest.html / latest.json; the report compares the run with
the earlier ones under REPORT. Exit status: 0 all checks pass, 1 a check failed (the report
has a FAIL banner), 2 bad arguments or config. Schedule it with cron or any scheduler and
alert on a non-zero exit (README: "Audits").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from corrdiff import DECODE_MODES  # noqa: E402
from pipeline.audit import AuditConfig, run_audit, run_verify  # noqa: E402
from pipeline.cluster import connect  # noqa: E402

EXIT_PASS, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", help="fsspec URL of the archive")
    parser.add_argument("--report", help="fsspec URL of the report prefix (one folder per audit)")
    parser.add_argument("--sample", help="images to score: a count of rows (1000) or a percentage of them (10%%)")
    parser.add_argument("--seed", type=int, help="sampling seed (default 0)")
    parser.add_argument("--config", help="YAML config (configs/audit.yaml documents every key)")
    parser.add_argument("--verify-all", action="store_true",
                        help="check every record's checksum and decodability (fast e2e decoder), no scoring")
    parser.add_argument("--mode", choices=DECODE_MODES, help="decoder to score (default corrdiff)")
    parser.add_argument("--model", help="decode every record with this model (default: each record's own)")
    parser.add_argument("--model-store", action="append", default=[], metavar="URL",
                        help="also look for models here (fsspec prefix of <model id>.safetensors; repeatable)")
    parser.add_argument("--device", help="auto, cpu or cuda")
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (credentials from the environment)")
    parser.add_argument("--audit-id", help="id of this audit (default: time + random suffix)")
    parser.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else a local cluster)")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> AuditConfig:
    data = (yaml.safe_load(Path(args.config).read_text()) or {}) if args.config else {}
    for flag in ("archive", "report", "sample", "seed", "mode", "model", "device", "audit_id"):
        if getattr(args, flag) is not None:
            data[flag] = getattr(args, flag)
    if args.endpoint_url:
        data["storage"] = dict(data.get("storage") or {}) | {"endpoint_url": args.endpoint_url}
    if args.model_store:
        data["model_stores"] = [*(data.get("model_stores") or ()), *args.model_store]
    if not data.get("archive") or not data.get("report"):
        raise ValueError("--archive and --report are required (or archive and report in --config)")
    return AuditConfig.from_dict(data)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = build_config(args)
    except (ValueError, TypeError, OSError) as error:
        print(f"audit: {error}", file=sys.stderr)
        return EXIT_USAGE
    connect(args.ray_address)
    summary = run_verify(config) if args.verify_all else run_audit(config)
    print(format_summary(summary))
    return EXIT_PASS if summary["verdict"] == "PASS" else EXIT_FAIL


def format_summary(summary: dict) -> str:
    m = summary["measures"]
    lines = [f"{summary['verdict']}  {summary['kind']} {summary['audit_id']} of {summary['archive']}"]
    if summary["kind"] == "audit":
        lines.append(f"sampled {m['sampled']} of {summary['archive_rows']} rows, scored {m['scored']}: "
                     f"median LPIPS {_f(m['lpips.median'])}, "
                     + (f"median DISTS {_f(m['dists.median'])}, " if summary["config"].get("dists") else "")
                     + f"p5 PSNR {_f(m['psnr.p5'])} dB, "
                     f"mean bpp {_f(m['bpp.mean'])}")
    else:
        lines.append(f"checked {m['sampled']} records: " + ", ".join(
            f"{k} {v}" for k, v in summary["record_statuses"].items()))
    lines.append(f"error rate {_f(m['error_rate'])}, integrity failures {m['integrity_failures']}")
    lines += [f"  {c['status'].upper():4}  {c['measure']} = {_f(c['value'])} (required {c['bound']})"
              for c in summary["checks"]]
    lines.append(f"report {summary['files']['report.html']}")
    return "\n".join(lines)


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


if __name__ == "__main__":
    sys.exit(main())

"""The command line: ``corrdiff-archive compress|restore|audit|train|evaluate [flags]``.

Every command builds its config the same way: its YAML file (``--config``), with the flags
on top, validated strictly into one typed config (``corrdiff.typed_config.load_config``),
then calls one run function and prints its summary. ``python jobs/<command>.py`` (what
``ray job submit`` runs) is this same function with the command filled in.

Exit status: 0 done (an audit: every check passed), 1 the work found a failure (an audit
check, a key not restored), 2 bad flags or config (argparse's own code for usage errors).

Each command imports its pipeline when it runs, not when this module is imported: training
runs on machines without Ray or pyarrow (tests/test_device_train.py).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from corrdiff import DECODE_MODES
from corrdiff.baselines import CLASSIC_CODECS
from corrdiff.metrics import PERCEPTUAL_METRICS
from corrdiff.typed_config import ConfigError, load_config

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
RAY_ADDRESS_HELP = "Ray cluster to join (default: RAY_ADDRESS, else a local cluster)"
ENDPOINT_HELP = "S3-compatible endpoint (credentials from the environment)"
MODEL_STORE_HELP = "also look for models here (fsspec prefix of <model id>.safetensors; repeatable)"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit status."""
    parser = argparse.ArgumentParser(prog="corrdiff-archive", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_flags, _) in COMMANDS.items():
        description = inspect.cleandoc(add_flags.__doc__ or "")
        add_flags(commands.add_parser(name, help=description.splitlines()[0], description=description,
                                      formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except ConfigError as error:
        print(f"{args.command}: {error}", file=sys.stderr)
        return EXIT_USAGE


def command_main(command: str) -> None:
    """``python jobs/<command>.py FLAGS``: this command line, the command filled in."""
    sys.exit(main([command, *sys.argv[1:]]))


def _compress_flags(parser: argparse.ArgumentParser) -> None:
    """Compress an image collection into a CorrDiff Parquet archive.

    Settings come from the defaults, then --config FILE (YAML, configs/compress.yaml
    documents every key), then the flags. Rerunning the same command resumes: keys already
    in the archive are skipped. Prints a summary and writes it as _summary.json in the archive.
    """
    parser.add_argument("--input", help="fsspec URL of the images: a folder/prefix, or a manifest file")
    parser.add_argument("--output", help="fsspec URL of the archive (a folder/prefix of Parquet files)")
    parser.add_argument("--config", help="YAML config file (configs/compress.yaml documents every key)")
    parser.add_argument("--input-kind", choices=["files", "tar", "parquet", "manifest"], help="layout of --input")
    parser.add_argument("--model", help="bundled model name or weights file (default: the default model)")
    parser.add_argument("--device", help="auto, cpu or cuda")
    parser.add_argument("--endpoint-url", help=ENDPOINT_HELP)
    parser.add_argument("--job-id", help="id recorded in every row (default: time + random suffix)")
    parser.add_argument("--allow-config-change", action="store_true", default=None,
                        help="resume an archive whose rows were made with another model, floor, steps or seed")
    parser.add_argument("--ray-address", help=RAY_ADDRESS_HELP)


def _compress(args: argparse.Namespace) -> int:
    from pipeline.cluster import connect
    from pipeline.compress import CompressConfig, run_compress
    from pipeline.summary_text import compress_summary_text

    config = load_config(CompressConfig, args.config, {
        "input.url": args.input, "input.kind": args.input_kind, "output": args.output, "codec.model": args.model,
        "codec.device": args.device, "storage.endpoint_url": args.endpoint_url, "job_id": args.job_id,
        "allow_config_change": args.allow_config_change})
    connect(args.ray_address)
    _job_log()
    print(compress_summary_text(run_compress(config)))
    return EXIT_OK


def _restore_flags(parser: argparse.ArgumentParser) -> None:
    """Restore images (PNG) from a CorrDiff archive: every key, or the keys you name.

    Each key K is written as OUTPUT/K.png (folders kept; unsafe keys percent-encoded, see
    pipeline/keys.py). OUTPUT/_restore/<run>.parquet maps every key to its file or to the
    reason it was not restored. Each record is decoded by the model whose id it carries, found
    in the archive's own _models/, then among the package's models, then in the stores named
    by --model-store (prefixes of <model id>.safetensors), unless --model names one.
    Exits 0 when every selected key was restored, 1 otherwise.
    """
    parser.add_argument("--archive", help="fsspec URL of the archive")
    parser.add_argument("--output", help="fsspec URL of the folder/prefix for the PNG files")
    parser.add_argument("--keys", nargs="+", help="restore only these keys")
    parser.add_argument("--keys-file", help="restore only the keys in this file, one per line ('-' = stdin)")
    parser.add_argument("--config", help="YAML config file (configs/restore.yaml documents every key)")
    parser.add_argument("--run-id", help="name of this run's manifest (default: time + random suffix)")
    _decoding_flags(parser, mode_help="corrdiff (default: the archived quality), e2e (fastest), diffusion")


def _decoding_flags(parser: argparse.ArgumentParser, mode_help: str) -> None:
    """The flags of the commands that decode records (restore, audit): how, with which
    model, on which device, from which storage and cluster."""
    parser.add_argument("--mode", choices=DECODE_MODES, help=mode_help)
    parser.add_argument("--model", help="decode every record with this model (default: each record's own)")
    parser.add_argument("--model-store", action="append", default=[], metavar="URL", help=MODEL_STORE_HELP)
    parser.add_argument("--device", help="auto (default), cpu or cuda")
    parser.add_argument("--endpoint-url", help=ENDPOINT_HELP)
    parser.add_argument("--ray-address", help=RAY_ADDRESS_HELP)


def _restore(args: argparse.Namespace) -> int:
    from pipeline.cluster import connect
    from pipeline.restore_archive import RestoreConfig, run_restore

    config = load_config(RestoreConfig, args.config, {
        "archive": args.archive, "output": args.output, "keys": _keys(args.keys, args.keys_file), "mode": args.mode,
        "model": args.model, "device": args.device, "storage.endpoint_url": args.endpoint_url,
        "run_id": args.run_id}, extend={"model_stores": args.model_store})
    connect(args.ray_address)
    _job_log()
    summary = run_restore(config)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    return EXIT_OK if summary["restored"] == summary["rows"] else EXIT_FAILED


def _keys(keys: list[str] | None, keys_file: str | None) -> list[str] | None:
    """The keys named by --keys and --keys-file together; None when neither was given (every key)."""
    if keys is None and keys_file is None:
        return None
    named = list(keys or [])
    if keys_file:
        text = sys.stdin.read() if keys_file == "-" else Path(keys_file).read_text()
        named += [line for line in text.splitlines() if line]
    return named


def _audit_flags(parser: argparse.ArgumentParser) -> None:
    """Audit an archive's quality (a seeded sample scored against the originals), or verify
    every record's integrity; write a report; exit 1 when a threshold is breached.

    Each run writes REPORT/<audit id>/report.html (self-contained), summary.json and
    metrics.parquet, and REPORT/latest.html / latest.json; the report compares the run with
    the earlier ones under REPORT. Exit status: 0 all checks pass, 1 a check failed (the report
    has a FAIL banner), 2 bad arguments or config. Schedule it with cron or any scheduler and
    alert on a non-zero exit (README: "Audit what you kept").
    """
    parser.add_argument("--archive", help="fsspec URL of the archive")
    parser.add_argument("--report", help="fsspec URL of the report prefix (one folder per audit)")
    parser.add_argument("--sample", help="images to score: a count of rows (1000) or a percentage of them (10%%)")
    parser.add_argument("--seed", type=int, help="sampling seed (default 0)")
    parser.add_argument("--config", help="YAML config (configs/audit.yaml documents every key)")
    parser.add_argument("--verify-all", action="store_true",
                        help="check every record's checksum and decodability (fast e2e decoder), no scoring")
    parser.add_argument("--audit-id", help="id of this audit (default: time + random suffix)")
    _decoding_flags(parser, mode_help="decoder to score (default corrdiff)")


def _audit(args: argparse.Namespace) -> int:
    from pipeline.audit import AuditConfig, run_audit, run_verify
    from pipeline.cluster import connect
    from pipeline.summary_text import audit_summary_text

    config = load_config(AuditConfig, args.config, {
        "archive": args.archive, "report": args.report, "sample": args.sample, "seed": args.seed, "mode": args.mode,
        "model": args.model, "device": args.device, "audit_id": args.audit_id,
        "storage.endpoint_url": args.endpoint_url}, extend={"model_stores": args.model_store})
    connect(args.ray_address)
    _job_log()
    summary = run_verify(config) if args.verify_all else run_audit(config)
    print(audit_summary_text(summary))
    return EXIT_OK if summary["verdict"] == "PASS" else EXIT_FAILED


def _train_flags(parser: argparse.ArgumentParser) -> None:
    """Train a CorrDiff model through its three phases, resumably, and export it.

    Rerunning the same command resumes from OUTPUT/checkpoint.pt. The loop, its checkpoints,
    log and time budget are described in corrdiff/trainer.py; docs/training.md says how the
    shipped models were trained.
    """
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
    parser.add_argument("--lpips", choices=["required", "optional"],
                        help="optional: skip phases that need it if absent")


def _train(args: argparse.Namespace) -> int:
    from corrdiff.trainer import TrainConfig
    from pipeline.train import run_train

    config = load_config(TrainConfig, args.config, {
        "data": args.data, "output": args.output, "device": args.device, "threads": args.threads,
        "max_seconds": args.max_seconds, "checkpoint_seconds": args.checkpoint_seconds,
        "export_checkpoints": args.export_checkpoints, "max_file_mib": args.max_file_mib, "lpips": args.lpips})
    with _progress_log():
        model_path = run_train(config)
    print(f"model written to {model_path}")
    return EXIT_OK


def _evaluate_flags(parser: argparse.ArgumentParser) -> None:
    """Evaluate a CorrDiff model against JPEG, WebP and AVIF at the same rate, image by image.

    Writes eval.json, eval.md and rate_quality.png to --output (default runs/eval/<model
    name>) and prints eval.md; corrdiff/evaluation.py says what is measured and how, and
    pipeline/evaluate.py what each file holds. --curve-qualities '' skips the classic codecs'
    curves, the slowest part on large images.
    """
    parser.add_argument("--images", help="fsspec URL or folder of test images")
    parser.add_argument("--model", help="a shipped model's name or a weights file")
    parser.add_argument("--output", help="output directory (default runs/eval/<model name>)")
    parser.add_argument("--config", help="YAML config (configs/evaluate.yaml documents every key)")
    parser.add_argument("--modes", type=_names,
                        help=f"decode modes, comma-separated (default {','.join(DECODE_MODES)})")
    parser.add_argument("--baselines", type=_names,
                        help=f"classic codecs, comma-separated ('' for none; default {','.join(CLASSIC_CODECS)})")
    parser.add_argument("--device", help="cpu (default) or cuda")
    parser.add_argument("--curve-qualities", type=_qualities,
                        help="qualities at which to trace each classic codec's curve, comma-separated ('' for none)")
    parser.add_argument("--gamma-refine-steps", type=int,
                        help="perceptual mode: Adam steps on MSE + --gamma-metric after the closed-form gamma "
                             "(0 = off)")
    parser.add_argument("--gamma-lr", type=float, help="learning rate of those steps (default 0.1)")
    parser.add_argument("--gamma-metric", choices=PERCEPTUAL_METRICS, help="the perceptual term of those steps")


def _evaluate(args: argparse.Namespace) -> int:
    from pipeline.evaluate import EvaluateConfig, run_evaluate
    from pipeline.evaluation_report import markdown

    config = load_config(EvaluateConfig, args.config, {
        "images": args.images, "model": args.model, "output": args.output, "modes": args.modes,
        "baselines": args.baselines, "device": args.device, "curve_qualities": args.curve_qualities,
        "gamma_refine_steps": args.gamma_refine_steps, "gamma_learning_rate": args.gamma_lr,
        "gamma_metric": args.gamma_metric})
    with _progress_log():
        report = run_evaluate(config)
    print(markdown(report))
    return EXIT_OK


def _names(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _qualities(text: str) -> list[int]:
    return [int(item) for item in _names(text)]


def _job_log() -> None:
    """The library's progress lines (its ``logging`` at INFO: what a run found to do, a
    resume) on stdout before the summary; other libraries' loggers stay at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout, force=True)
    for package in ("pipeline", "corrdiff"):
        logging.getLogger(package).setLevel(logging.INFO)


def _progress_log() -> AbstractContextManager[None]:
    """The library's INFO messages on stdout (a training or evaluation log), written around
    the tqdm bars rather than through them."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    return logging_redirect_tqdm()


COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "compress": (_compress_flags, _compress),
    "restore": (_restore_flags, _restore),
    "audit": (_audit_flags, _audit),
    "train": (_train_flags, _train),
    "evaluate": (_evaluate_flags, _evaluate),
}

if __name__ == "__main__":
    sys.exit(main())

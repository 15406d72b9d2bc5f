"""The audit pipeline: how good is what the archive holds, and is all of it still there?

Audit (a seeded sample, scored)::

    footers (driver) -> sample rows, stratified by file -> read them (tasks)
        -> FetchOriginals (CPU tasks): fetch each archived image's original (a file, a tar
           member, a Parquet cell: pipeline/originals.py), check its SHA-256, decode it
        -> ScoreRecords (actors): restore the record, score PSNR / MS-SSIM / LPIPS / bpp
           (and DISTS with ``dists: true``)
        -> the worst images again: FetchOriginals -> CropWorst (a second, tiny pass)
        -> REPORT/<audit id>/metrics.parquet, summary.json, report.html

Verify (``--verify-all``; every record, no scoring)::

    footers -> every row -> RestoreRecords (e2e: the fast decoder; checksum, format, model,
        entropy decoding all exercised) -> REPORT/<audit id>/problems.parquet, summary.json,
        report.html

Both end in checks against the configured thresholds (pipeline/thresholds.py) and compare
with the earlier audits under the same report prefix. Nothing found is ever an exception:
a corrupt record, a missing original or an unreadable file is a row and a count. The
stages are in pipeline/audit_stages.py (and pipeline/restore.py: RestoreRecords).
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from corrdiff import check_decode_mode
from corrdiff.floor import fallback_share

from pipeline.audit_stages import (CROP_SCHEMA, METRICS_SCHEMA, ORIGINAL_CHANGED, ORIGINAL_MISSING,
                                   ORIGINAL_NO_CHECKSUM, ORIGINAL_UNREADABLE, UNREADABLE_FILE, CropWorst,
                                   FetchOriginals, ScoreRecords)
from pipeline.images import DEFAULT_MAX_PIXELS
from pipeline.models import ModelSources, StoredModelCheck, check_stored_models, model_locations
from pipeline.report import worst_first, write_report
from pipeline.resources import ResourcePlan, ResourceSettings
from pipeline.restore import COMPRESS_ERROR, CORRUPT, DECODE_FAILED, MODEL_MISSING, OK, WORKER_DIED, RestoreRecords
from pipeline.run_ids import new_run_id
from pipeline.selection import (ArchiveFile, FileSelection, all_rows, archive_files, read_selected, sample_rows,
                                sample_size, split_file_rows, with_read_failures)
from pipeline.sources import DEFAULT_MAX_IMAGE_BYTES
from pipeline.stage import ModelStage
from pipeline.storage import StorageConfig
from pipeline.thresholds import METRICS, STATISTICS, Check, evaluate, parse_thresholds, verdict
from pipeline.worker_memory import audit_worker_bytes, restore_worker_bytes, sized_plan

DAMAGED_MODEL_FILE = "damaged_model_file"  # status of a row standing for a _models/ file that fails verification

DEFAULT_THRESHOLDS = {"integrity_failures": {"max": 0}}


@dataclass(frozen=True)
class AuditConfig:
    archive: str
    report: str
    sample: int | str = 200  # a count of rows (200, "200") or a percentage of them ("10%")
    seed: int = 0
    mode: str = "corrdiff"
    model: str | None = None  # None = each record's own model, found by its id (pipeline.models)
    model_stores: tuple[str, ...] = ()  # fsspec prefixes of <model id>.safetensors, searched after the archive and package
    device: str = "auto"
    lpips_net: str = "alex"
    # Also score DISTS (corrdiff.metrics.DISTS): a second perceptual opinion, one that
    # tolerates resampled texture, which a generative decoder produces; one VGG16 pass
    # more per original and per reconstruction.
    dists: bool = False
    worst: int = 6  # images shown side by side with their originals
    crop: int = 256  # side of those crops, px
    max_pixels: int = DEFAULT_MAX_PIXELS
    # The largest original read (a file, tar member or Parquet cell), as input.max_image_bytes
    # at compression: an original that grew past it since is unreadable, never held whole.
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    thresholds: dict[str, dict[str, float]] = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))
    storage: StorageConfig = field(default_factory=StorageConfig)
    resources: ResourceSettings = field(default_factory=ResourceSettings)
    audit_id: str | None = None

    def __post_init__(self) -> None:
        check_decode_mode(self.mode)
        if self.max_image_bytes < 1:
            raise ValueError(f"max_image_bytes must be at least 1, not {self.max_image_bytes}")
        sample_size(self.sample, total=1)  # the sampler's own validation, before any work
        thresholds = parse_thresholds(self.thresholds)  # a typo in a threshold fails before any work
        unscored = [t.measure for t in thresholds if t.measure.startswith("dists.") and not self.dists]
        if unscored:
            raise ValueError(f"threshold {unscored[0]} needs DISTS scored: set dists: true")

    @property
    def models(self) -> ModelSources:
        return ModelSources(self.archive, self.storage, self.model_stores)

    def to_dict(self) -> dict[str, Any]:
        """As recorded in the summary: credentials are never written out."""
        data = dataclasses.asdict(self)
        data["storage"] = self.storage.public()
        return data


# Running ------------------------------------------------------------------------------


def run_audit(config: AuditConfig) -> dict[str, Any]:
    """Sample, score, report; return the summary (with its verdict). Ray must be initialised."""
    audit_id = config.audit_id or new_run_id()
    started = time.time()
    thresholds = parse_thresholds(config.thresholds)
    files = _files(config.archive, config.storage)
    selections = sample_rows(files, config.sample, config.seed)
    sampled = {s.path for s in selections}
    plan = sized_plan(config.resources, audit_worker_bytes([f for f in files if f.path in sampled], config.models,
                                                           config.model, config.resources.actor_batch_size,
                                                           config.dists), f"audit {audit_id}")
    scored, failures = split_file_rows(_on_originals(selections, config, plan, ScoreRecords, {
        "lpips_net": config.lpips_net, "dists": config.dists}, METRICS_SCHEMA))
    files = with_read_failures(files, failures)
    metrics = pa.concat_tables([scored, _unreadable_file_rows(files)])
    crops = _on_originals(_selection_of(_worst(metrics, config.worst)), config, plan, CropWorst,
                          {"side": config.crop}, CROP_SCHEMA)
    measures = audit_measures(metrics, files)
    summary = _summary("audit", audit_id, config, files, measures, evaluate(thresholds, measures), started)
    summary["by_codec"] = by_codec(metrics)
    summary["models"] = model_locations(metrics["model_id"].to_pylist(), config.models)
    write_report(config.report, config.storage, summary, metrics, crops)
    return summary


def run_verify(config: AuditConfig) -> dict[str, Any]:
    """Check every record's checksum and decodability (e2e decoder), without scoring."""
    audit_id = config.audit_id or new_run_id()
    started = time.time()
    thresholds = parse_thresholds(config.thresholds)
    files = _files(config.archive, config.storage)
    plan = sized_plan(config.resources, restore_worker_bytes(files, config.models, config.model,
                                                             config.resources.actor_batch_size), f"verify {audit_id}")
    dataset = read_selected(all_rows(files), config.storage,
                            columns=["key", "record", "codec", "error", "model_id", "width", "height"])
    dataset = plan.apply(dataset, RestoreRecords, {
        "models": config.models, "model": config.model, "device": config.device,
        "torch_threads": plan.torch_threads, "mode": "e2e", "keep_pixels": False,
    })
    statuses: Counter[str] = Counter()
    codecs: Counter[str] = Counter()
    models: set[str | None] = set()
    problems = []
    failures: dict[str, str] = {}
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        batch, failed = split_file_rows(batch.drop_columns(["pixels"]))
        failures |= failed
        statuses.update(batch["status"].to_pylist())
        codecs.update(c for c in batch["codec"].to_pylist() if c is not None)
        models.update(batch["model_id"].to_pylist())
        bad = batch.filter(pc.not_equal(batch["status"], OK))
        if bad.num_rows:
            problems.append(bad)
    table = pa.concat_tables(problems) if problems else None
    files = with_read_failures(files, failures)
    stored = check_stored_models(config.archive, config.storage)
    metrics = _problem_rows(table, files, stored)
    measures = verify_measures(statuses, files, stored) | {"fallback_share": fallback_share(codecs)}
    summary = _summary("verify", audit_id, config, files, measures, evaluate(thresholds, measures), started)
    summary["by_codec"] = {codec: {"records": n} for codec, n in sorted(codecs.items())}
    summary["record_statuses"] = dict(sorted(statuses.items()))
    summary["models"] = model_locations(models, config.models)
    summary["stored_models"] = {check.path: check.error or "ok" for check in stored}
    write_report(config.report, config.storage, summary, metrics, CROP_SCHEMA.empty_table())
    return summary


def _files(url: str, storage: StorageConfig) -> list[ArchiveFile]:
    files = archive_files(url, storage)
    if not files:
        raise FileNotFoundError(f"no archive data files under {url}")
    return files


def _on_originals(selections: list[FileSelection], config: AuditConfig, plan: ResourcePlan, stage: type[ModelStage],
                  settings: dict[str, Any], schema: pa.Schema) -> pa.Table:
    """The selected rows with their originals (FetchOriginals), through ``stage`` (ScoreRecords
    or CropWorst, built with the restore settings and ``settings``): its rows, in ``schema``."""
    if not selections:
        return schema.empty_table()
    dataset = read_selected(selections, config.storage)
    dataset = plan.apply(dataset, FetchOriginals, {
        "storage": config.storage, "max_pixels": config.max_pixels, "max_image_bytes": config.max_image_bytes,
        "limits": plan.image_limits,
    })
    dataset = plan.apply(dataset, stage, {
        "models": config.models, "model": config.model, "device": config.device,
        "torch_threads": plan.torch_threads, "mode": config.mode, **settings,
    })
    tables = [t for t in dataset.iter_batches(batch_format="pyarrow", batch_size=None) if t.num_rows]
    return pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()


def _worst(metrics: pa.Table, count: int) -> list[tuple[str, int]]:
    """(file, row) of the ``count`` worst scored images (:func:`worst_first`)."""
    scored = [r for r in metrics.select(["archive_file", "archive_row", "lpips", "psnr"]).to_pylist()
              if r["psnr"] is not None]
    scored.sort(key=worst_first)
    return [(r["archive_file"], r["archive_row"]) for r in scored[:count]]


def _selection_of(rows: list[tuple[str, int]]) -> list[FileSelection]:
    wanted: dict[str, list[int]] = {}
    for path, row in rows:
        wanted.setdefault(path, []).append(row)
    return [FileSelection(path, tuple(sorted(positions))) for path, positions in wanted.items()]


def _unreadable_file_rows(files: list[ArchiveFile]) -> pa.Table:
    return pa.Table.from_pylist([{"key": None, "archive_file": f.path, "archive_row": -1,
                                  "record_status": UNREADABLE_FILE, "error": f.error} for f in files if f.error],
                                schema=METRICS_SCHEMA)


def _problem_rows(problems: pa.Table | None, files: list[ArchiveFile], stored: list[StoredModelCheck]) -> pa.Table:
    """Verify's findings in the metrics schema (so one report renders both kinds of run)."""
    rows = [] if problems is None else [
        {"key": r["key"], "archive_file": r["archive_file"], "archive_row": r["archive_row"],
         "model_id": r["model_id"], "record_status": r["status"], "error": r["error"]}
        for r in problems.to_pylist()]
    rows += [{"archive_file": check.path, "archive_row": -1, "record_status": DAMAGED_MODEL_FILE, "error": check.error}
             for check in stored if check.error]
    return pa.concat_tables([pa.Table.from_pylist(rows, schema=METRICS_SCHEMA), _unreadable_file_rows(files)])


# Measures -----------------------------------------------------------------------------


def audit_measures(metrics: pa.Table, files: list[ArchiveFile]) -> dict[str, float | None]:
    """Every measure a threshold can name (pipeline/thresholds.py), from the per-image table
    and the archive's files (for the rows that unreadable files held)."""
    records = Counter(metrics["record_status"].to_pylist())
    originals = Counter(metrics["original_status"].to_pylist())
    sampled = metrics.num_rows - records.get(UNREADABLE_FILE, 0)
    measures: dict[str, float | None] = {}
    for metric in METRICS:
        values = np.array([v for v in metrics[metric].to_pylist() if v is not None], dtype=np.float64)
        measures |= {f"{metric}.{s}": _statistic(values, s) for s in STATISTICS}
    measures["scored"] = int(pc.sum(pc.is_valid(metrics["psnr"])).as_py() or 0)
    measures["fallback_share"] = fallback_share(Counter(c for c in metrics["codec"].to_pylist() if c is not None))
    measures |= _record_counts(records, sampled, files)
    measures |= {
        "missing_originals": originals.get(ORIGINAL_MISSING, 0),
        "changed_originals": originals.get(ORIGINAL_CHANGED, 0),
        "unreadable_originals": originals.get(ORIGINAL_UNREADABLE, 0),
        "originals_without_checksum": originals.get(ORIGINAL_NO_CHECKSUM, 0),
    }
    return measures


def verify_measures(statuses: Counter[str], files: list[ArchiveFile],
                    stored: list[StoredModelCheck]) -> dict[str, float | None]:
    """The record counts, and the archive's own model files that fail verification: a damaged
    copy is an integrity failure even while another copy (the package's) still decodes."""
    measures = _record_counts(Counter(statuses), sum(statuses.values()), files)
    damaged = sum(1 for check in stored if check.error)
    return measures | {"damaged_model_files": damaged, "integrity_failures": measures["integrity_failures"] + damaged}


def _record_counts(records: Counter[str], rows: int, files: list[ArchiveFile]) -> dict[str, float | None]:
    """Counts by record status, and the unreadable files: each is an integrity failure per row
    its footer says it held (every one of them is lost), or one if even the footer is gone."""
    failed = sum(records.get(s, 0) for s in (COMPRESS_ERROR, CORRUPT, DECODE_FAILED, MODEL_MISSING, WORKER_DIED))
    unreadable = [f for f in files if f.error]
    return {
        "sampled": rows,
        "error_rate": failed / rows if rows else None,
        "compress_errors": records.get(COMPRESS_ERROR, 0),
        "corrupt_records": records.get(CORRUPT, 0),
        "decode_failures": records.get(DECODE_FAILED, 0),
        "model_missing": records.get(MODEL_MISSING, 0),
        "worker_deaths": records.get(WORKER_DIED, 0),
        "unreadable_files": len(unreadable),
        "unreadable_rows": sum(f.rows for f in unreadable),
        "integrity_failures": sum(records.get(s, 0) for s in (CORRUPT, DECODE_FAILED, MODEL_MISSING, WORKER_DIED))
        + sum(max(1, f.rows) for f in unreadable),
    }


# What the audit says of each codec's sampled records (summary "by_codec", the report's table).
BY_CODEC_MEASURES = (("bpp", "mean"), ("psnr", "median"), ("psnr", "p5"), ("lpips", "median"))


def by_codec(metrics: pa.Table) -> dict[str, dict[str, float | None]]:
    """Per codec in the sample: how many records, their bits and their quality as scored
    against the originals (:data:`BY_CODEC_MEASURES`)."""
    rows = [r for r in metrics.select(["codec", "bpp", "psnr", "lpips"]).to_pylist() if r["codec"] is not None]
    out: dict[str, dict[str, float | None]] = {}
    for codec in sorted({r["codec"] for r in rows}):
        mine = [r for r in rows if r["codec"] == codec]
        out[codec] = {"records": len(mine)} | {
            f"{metric}.{statistic}": _statistic(np.array([r[metric] for r in mine if r[metric] is not None],
                                                         dtype=np.float64), statistic)
            for metric, statistic in BY_CODEC_MEASURES}
    return out


def _statistic(values: np.ndarray, statistic: str) -> float | None:
    if values.size == 0:
        return None
    if statistic == "mean":
        return float(values.mean())
    if statistic in ("min", "max"):
        return float(getattr(values, statistic)())
    quantile = {"median": 50, "p5": 5, "p95": 95}[statistic]
    return float(np.percentile(values, quantile))


def _summary(kind: str, audit_id: str, config: AuditConfig, files: list[ArchiveFile],
             measures: dict[str, float | None], checks: list[Check], started: float) -> dict[str, Any]:
    return {
        "kind": kind, "audit_id": audit_id, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "archive": config.archive, "report": config.report, "verdict": verdict(checks),
        "archive_rows": sum(f.rows for f in files), "archive_files": len(files),
        "measures": measures, "checks": [c.to_dict() for c in checks],
        "seconds": round(time.time() - started, 2), "config": config.to_dict(),
    }

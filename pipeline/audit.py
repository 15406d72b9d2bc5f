"""The audit pipeline: how good is what the archive holds, and is all of it still there?

Audit (a seeded sample, scored)::

    footers (driver) -> sample rows, stratified by file -> read them (tasks)
        -> fetch_originals (CPU tasks): fetch each archived image's original (a file, a tar
           member, a Parquet cell: pipeline/originals.py), check its SHA-256, decode it
        -> AuditStage (actors): decode the record, score PSNR / MS-SSIM / LPIPS / bpp
           (and DISTS with ``dists: true``)
        -> the worst images again through AuditStage with crops (a second, tiny pass)
        -> REPORT/<audit id>/metrics.parquet, summary.json, report.html

Verify (``--verify-all``; every record, no scoring)::

    footers -> every row -> DecodeStage (e2e: the fast decoder; checksum, format, model,
        entropy decoding all exercised) -> REPORT/<audit id>/problems.parquet, summary.json,
        report.html

Both end in checks against the configured thresholds (pipeline/thresholds.py) and compare
with the earlier audits under the same report prefix. Nothing found is ever an exception:
a corrupt record, a missing original or an unreadable file is a row and a count.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from PIL import Image

from corrdiff import check_decode_mode
from corrdiff.floor import fallback_share

from pipeline.compress import new_job_id
from pipeline.image_decoder import Decode, isolated_decoder
from pipeline.images import DEFAULT_MAX_PIXELS
from pipeline.isolation import WorkerLimits
from pipeline.models import ModelSources, StoredModelCheck, check_stored_models, model_locations
from pipeline.originals import Original, read_originals
from pipeline.report import worst_first, write_report
from pipeline.resources import ResourcePlan, ResourceSettings, plan_resources
from pipeline.restore import COMPRESS_ERROR, CORRUPT, DECODE_FAILED, MODEL_MISSING, OK, WORKER_DIED, RecordDecoder
from pipeline.restore_archive import DecodeStage
from pipeline.selection import (UNREADABLE_FILE_KEY, ArchiveFile, FileSelection, all_rows, archive_files,
                                read_selected, sample_rows, sample_size, split_file_rows, with_read_failures)
from pipeline.sources import DEFAULT_MAX_IMAGE_BYTES
from pipeline.stages import EMPTY_PIXELS, ragged_column
from pipeline.storage import StorageConfig
from pipeline.thresholds import METRICS, STATISTICS, Check, evaluate, parse_thresholds, verdict

# Original statuses: what fetching source_uri and hashing it found.
ORIGINAL_OK, ORIGINAL_MISSING, ORIGINAL_CHANGED = "ok", "missing", "changed"
ORIGINAL_UNREADABLE, ORIGINAL_NO_CHECKSUM = "unreadable", "no_checksum"
UNREADABLE_FILE = "unreadable_file"  # record status of a row standing for a whole unreadable data file
DAMAGED_MODEL_FILE = "damaged_model_file"  # status of a row standing for a _models/ file that fails verification

DEFAULT_THRESHOLDS = {"integrity_failures": {"max": 0}}

METRICS_SCHEMA = pa.schema([
    ("key", pa.string()), ("archive_file", pa.string()), ("archive_row", pa.int64()), ("source_uri", pa.string()),
    ("model_id", pa.string()), ("codec", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("record_bytes", pa.int64()),
    ("bpp", pa.float64()), ("psnr", pa.float64()), ("ms_ssim", pa.float64()), ("lpips", pa.float64()),
    ("dists", pa.float64()), ("archived_psnr", pa.float64()), ("record_status", pa.string()), ("original_status", pa.string()),
    ("error", pa.string()), ("seconds", pa.float64()),
])
CROP_SCHEMA = pa.schema([("key", pa.string()), ("original_png", pa.binary()), ("restored_png", pa.binary()),
                         ("crop_box", pa.list_(pa.int32()))])


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


def fetch_originals(batch: pa.Table, storage: StorageConfig, max_pixels: int, max_image_bytes: int,
                    limits: WorkerLimits) -> pa.Table:
    """CPU task: each row's original, fetched where its source_uri says (pipeline/originals.py:
    the shards and Parquet files of a batch each read once), checked against the archived
    SHA-256 and decoded, with its status. Fetching and image decoding run here, in tasks, so
    that object-store latency never idles the model actors (and their GPUs). The originals
    are decoded in a child process bounded by ``limits`` (pipeline.image_decoder): one that
    crashes the decoder gets the error ``original does not decode: decode crashed
    (retryable): ...``, and the others are scored.

    Error rows (``error`` set: no record, nothing to score) and rows standing for unreadable
    data files are not fetched: their original status is null."""
    rows = batch.select(["key", "archive_file", "archive_row", "source_uri", "source_sha256", "error"]).to_pylist()
    wanted = [row for row in rows if row["error"] is None and not _stands_for_file(row)]
    fetched = iter(read_originals(wanted, storage, max_image_bytes))
    pixels, statuses, errors = [], [], []
    with isolated_decoder(max_pixels, limits) as decode:
        for row in rows:
            original, status, error = (None, None, None) if row["error"] is not None or _stands_for_file(row) else \
                _original(next(fetched), row["source_uri"], row["source_sha256"], decode)
            pixels.append(original if original is not None else EMPTY_PIXELS)
            statuses.append(status)
            errors.append(error)
    return (batch.append_column("original_status", pa.array(statuses, pa.string()))
            .append_column("original_error", pa.array(errors, pa.string()))
            .append_column("original", ragged_column(pixels)))


def _stands_for_file(row: dict[str, Any]) -> bool:
    """Whether a row stands for a whole unreadable data file (pipeline.selection)."""
    return row["key"] == UNREADABLE_FILE_KEY and row["archive_row"] == -1


def _original(fetched: Original, uri: str, sha256: str | None,
              decode: Decode) -> tuple[np.ndarray | None, str, str | None]:
    """The original's pixels if it is there and unchanged, its status, and why not."""
    if isinstance(fetched, FileNotFoundError):
        return None, ORIGINAL_MISSING, f"original missing: {uri}"
    if isinstance(fetched, Exception):
        return None, ORIGINAL_UNREADABLE, f"original unreadable: {type(fetched).__name__}: {fetched}"
    if sha256 is None:
        status = ORIGINAL_NO_CHECKSUM
    elif hashlib.sha256(fetched).hexdigest() != sha256:
        return None, ORIGINAL_CHANGED, "original changed since it was archived (SHA-256 differs)"
    else:
        status = ORIGINAL_OK
    decoded = decode(fetched)
    if isinstance(decoded, str):  # e.g. an original that never decoded
        return None, status, f"original does not decode: {decoded}"
    return decoded, status, None


class AuditStage:
    """Actor stage: decode each row's record and score it against its original
    (``crop`` > 0: cut the worst region of both instead)."""

    def __init__(self, models: ModelSources, model: str | None, device: str, torch_threads: int | None, mode: str,
                 lpips_net: str, dists: bool = False, crop: int = 0) -> None:
        self.models, self.model, self.device, self.torch_threads, self.mode = models, model, device, torch_threads, mode
        self.lpips_net, self.score_dists, self.crop = lpips_net, dists, crop
        self.setup()

    def setup(self) -> None:
        from corrdiff.codec import pick_device
        from corrdiff.metrics import DISTS, LPIPS

        self.decoder = RecordDecoder(self.models, self.model, self.device, self.torch_threads)
        device = pick_device(self.decoder.device)
        self.lpips = LPIPS(self.lpips_net, device=device)
        self.dists = DISTS(device=device) if self.score_dists and not self.crop else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        originals = batch.column("original").combine_chunks().to_numpy()
        rows = [self._one(row, original if original.size else None)
                for row, original in zip(batch.drop_columns(["original"]).to_pylist(), originals)]
        if self.crop:
            return pa.Table.from_pylist([r for r in rows if "original_png" in r], schema=CROP_SCHEMA)
        return pa.Table.from_pylist(rows, schema=METRICS_SCHEMA)

    @classmethod
    def lost(cls, batch: pa.Table, reason: str, settings: dict[str, Any]) -> pa.Table:
        """Rows for records whose restore or scoring killed the worker (pipeline.isolation);
        no crops of them."""
        if settings["crop"]:
            return CROP_SCHEMA.empty_table()
        rows = [_identity(row) | {"record_status": WORKER_DIED, "error": reason, "seconds": 0.0}
                for row in batch.drop_columns(["original"]).to_pylist()]
        return pa.Table.from_pylist(rows, schema=METRICS_SCHEMA)

    def _one(self, row: dict[str, Any], original: np.ndarray | None) -> dict[str, Any]:
        from corrdiff.metrics import bits_per_pixel, ms_ssim, psnr

        started = time.perf_counter()
        out = _identity(row)
        if _stands_for_file(row):
            return out | {"record_status": UNREADABLE_FILE, "error": row["error"], "seconds": 0.0}
        restored = self.decoder.restore(row["record"], row["error"], self.mode, row["codec"])
        out |= {"record_status": restored.status, "model_id": restored.model_id or row.get("model_id"),
                "error": restored.error or row["original_error"]}
        if row["record"] is not None and row["width"] and row["height"]:
            out["bpp"] = bits_per_pixel(len(row["record"]), row["height"], row["width"])
        if restored.status == OK and original is not None:
            if original.shape != restored.pixels.shape:
                out["error"] = f"original is {original.shape[1]}x{original.shape[0]}, restored image " \
                               f"{restored.pixels.shape[1]}x{restored.pixels.shape[0]}"
            elif self.crop:
                return {"key": row["key"], **_crops(original, restored.pixels, self.crop)}
            else:
                out["psnr"] = psnr(original, restored.pixels)
                out["ms_ssim"] = ms_ssim(original, restored.pixels)
                if min(original.shape[:2]) >= self.lpips.min_side:
                    out["lpips"] = self.lpips(original, restored.pixels)
                if self.dists is not None:
                    out["dists"] = self.dists(original, restored.pixels)
        out["seconds"] = time.perf_counter() - started
        return out


def _identity(row: dict[str, Any]) -> dict[str, Any]:
    """What a metrics row says of the archive row it scores, before any scoring."""
    out = {name: row.get(name) for name in ("key", "archive_file", "archive_row", "source_uri", "width",
                                            "height", "record_bytes", "model_id", "codec", "original_status")}
    return out | {"archived_psnr": row.get("psnr")}


def _crops(original: np.ndarray, restored: np.ndarray, side: int) -> dict[str, Any]:
    """The ``side`` x ``side`` window with the largest squared error, from both images, as PNG."""
    height, width = original.shape[:2]
    h, w = min(side, height), min(side, width)
    error = ((original.astype(np.float64) - restored.astype(np.float64)) ** 2).sum(axis=2)
    integral = np.pad(error.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = integral[h:, w:] - integral[:-h, w:] - integral[h:, :-w] + integral[:-h, :-w]
    step_y, step_x = max(1, h // 4), max(1, w // 4)
    grid = sums[::step_y, ::step_x]
    iy, ix = np.unravel_index(int(np.argmax(grid)), grid.shape)
    top, left = iy * step_y, ix * step_x
    pngs = []
    for image in (original, restored):
        buffer = io.BytesIO()
        Image.fromarray(image[top:top + h, left:left + w]).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    return {"original_png": pngs[0], "restored_png": pngs[1], "crop_box": [left, top, w, h]}


# Running ------------------------------------------------------------------------------


def run_audit(config: AuditConfig) -> dict[str, Any]:
    """Sample, score, report; return the summary (with its verdict). Ray must be initialised."""
    audit_id = config.audit_id or new_job_id()
    started = time.time()
    thresholds = parse_thresholds(config.thresholds)
    files = _files(config.archive, config.storage)
    selections = sample_rows(files, config.sample, config.seed)
    plan = plan_resources(config.resources, ray.cluster_resources())
    scored, failures = split_file_rows(_score(selections, config, plan, crop=0))
    files = with_read_failures(files, failures)
    metrics = pa.concat_tables([scored, _unreadable_file_rows(files)])
    crops = _score(_selection_of(_worst(metrics, config.worst)), config, plan, crop=config.crop)
    measures = audit_measures(metrics, files)
    summary = _summary("audit", audit_id, config, files, measures, evaluate(thresholds, measures), started)
    summary["by_codec"] = by_codec(metrics)
    summary["models"] = model_locations(metrics["model_id"].to_pylist(), config.models)
    write_report(config.report, config.storage, summary, metrics, crops)
    return summary


def run_verify(config: AuditConfig) -> dict[str, Any]:
    """Check every record's checksum and decodability (e2e decoder), without scoring."""
    audit_id = config.audit_id or new_job_id()
    started = time.time()
    thresholds = parse_thresholds(config.thresholds)
    files = _files(config.archive, config.storage)
    plan = plan_resources(config.resources, ray.cluster_resources())
    dataset = read_selected(all_rows(files), config.storage,
                            columns=["key", "record", "codec", "error", "model_id", "width", "height"])
    dataset = plan.model_stage(dataset, DecodeStage, {
        "models": config.models, "model": config.model, "device": config.device,
        "torch_threads": plan.torch_threads, "mode": "e2e", "keep_pixels": False,
    }, batch_format="pyarrow")
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


def _score(selections: list[FileSelection], config: AuditConfig, plan: ResourcePlan, crop: int) -> pa.Table:
    """Run AuditStage over the selected rows: metrics, or (``crop`` > 0) worst-region crops."""
    schema = CROP_SCHEMA if crop else METRICS_SCHEMA
    if not selections:
        return schema.empty_table()
    dataset = read_selected(selections, config.storage)
    dataset = plan.image_stage(dataset, fetch_originals, {
        "storage": config.storage, "max_pixels": config.max_pixels, "max_image_bytes": config.max_image_bytes,
    }, batch_format="pyarrow")
    dataset = plan.model_stage(dataset, AuditStage, {
        "models": config.models, "model": config.model, "device": config.device,
        "torch_threads": plan.torch_threads, "mode": config.mode,
        "lpips_net": config.lpips_net, "dists": config.dists, "crop": crop,
    }, batch_format="pyarrow")
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

"""Which rows of an archive a restore, audit or verify job reads, and reading them in tasks.

A job never pulls an archive through the driver. The driver reads only Parquet footers
(row counts and key ranges: a few KB per file, whatever the archive's size) and decides,
per file, which rows to read: all of them, a seeded sample, or those whose key is asked
for (only in the files whose key range can hold one). Tasks then read those rows (with
the record bytes) one file at a time.

Sampling is stratified by file: the sample size is split over files in proportion to
their row counts (largest remainders), then each file's rows are drawn uniformly without
replacement. Every file of a large archive is represented, and the same seed over the
same files gives the same sample (a rerun of an audit scores the same images).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from fsspec import AbstractFileSystem

from pipeline.archive import (MAX_TORCH_THREADS, SCHEMA, THREADS_KEY, key_range, largest_image, per_data_file,
                              range_may_hold, read_data_file_rows)
from pipeline.storage import StorageConfig, filesystem, with_retries

# The archive columns the restore and audit stages need; never "gammas" or other bulk.
ROW_COLUMNS = ["key", "source_uri", "source_sha256", "width", "height", "record", "codec", "record_bytes", "bpp",
               "psnr", "lpips", "model_id", "error"]
UNREADABLE_FILE_KEY = "#file"  # the key of a row that stands for an unreadable data file


@dataclass(frozen=True)
class ArchiveFile:
    """A data file of the archive, its row count and key range from the footer, or why it is unreadable."""

    path: str  # full URL
    rows: int
    error: str | None = None
    keys: tuple[str, str] | None = None  # its smallest and largest key (archive.key_range); None: unknown
    # What restoring its records takes (pipeline.worker_memory): at least the pixels of its
    # largest image (archive.largest_image; None: unknown), the model that wrote its CorrDiff
    # records and the tile side and batch that run coded them with (from its footer's job
    # metadata).
    largest_image: int | None = None
    model_id: str | None = None
    tile: int | None = None
    tile_batch: int | None = None


@dataclass(frozen=True)
class FileSelection:
    """Rows to read from one file: ``rows`` (sorted positions) or, if None, every row."""

    path: str
    rows: tuple[int, ...] | None = None


def archive_files(url: str, storage: StorageConfig) -> list[ArchiveFile]:
    """Every data file with its row count, key range and what restoring it takes, from its
    footer (read in parallel: archive.per_data_file); a file whose footer cannot be read is
    kept, with its error, so that jobs report it instead of failing or silently skipping it."""
    return [file for _, _, file in per_data_file(url, storage, partial(_archive_file, storage=storage))]


def _archive_file(path: str, fs: AbstractFileSystem, storage: StorageConfig) -> ArchiveFile:
    full = fs.unstrip_protocol(path)
    try:
        metadata = with_retries(lambda: pq.read_metadata(path, filesystem=fs), storage, f"read {full}")
    except Exception as error:  # noqa: BLE001 - a broken file is a finding, not a crash
        return ArchiveFile(full, 0, f"unreadable archive file: {type(error).__name__}: {error}")
    return ArchiveFile(full, metadata.num_rows, keys=key_range(metadata), largest_image=largest_image(metadata),
                       **_job_of(metadata.metadata or {}))


def _job_of(metadata: dict[bytes, bytes]) -> dict[str, Any]:
    """The model id, tile side and tile batch a file's footer names, as written there:
    untrusted, and checked where they are used (pipeline.worker_memory). A job that named a
    tile and no batch ran before batches existed: its tiles ran one at a time. This module
    stays free of the codec's imports: its read tasks run in workers that need no torch."""
    try:
        codec = json.loads(metadata.get(b"corrdiff.config", b"{}"))["codec"]
        tile, tile_batch = codec["tile"], codec.get("tile_batch", 1)
    except (ValueError, KeyError, TypeError, AttributeError):
        tile = tile_batch = None
    model_id = metadata.get(b"corrdiff.model_id")
    return {"model_id": model_id[:64].decode("ascii", "replace") if model_id else None,
            "tile": tile if isinstance(tile, int) else None,
            "tile_batch": tile_batch if isinstance(tile_batch, int) else None}


def sample_size(sample: int | str, total: int) -> int:
    """How many of ``total`` rows a sample setting asks for.

    A count (an int, or a string of digits; capped at ``total``) or a percentage of the rows
    (``"10%"``, ``"0.1%"``; at least one row). Nothing else: a bare ``1.0`` or ``0.5`` is
    refused, because "one row" and "every row" must never look alike.
    """
    if isinstance(sample, str) and sample.strip().endswith("%"):
        try:
            percent = float(sample.strip()[:-1])
        except ValueError:
            percent = math.nan
        if not 0 < percent <= 100:
            raise ValueError(f"a sample percentage must be in (0%, 100%], got {sample!r}")
        return min(total, max(1, math.ceil(percent / 100 * total))) if total else 0
    if isinstance(sample, str) and sample.strip().isdigit():
        sample = int(sample.strip())
    if isinstance(sample, bool) or not isinstance(sample, int):
        hint = f" (did you mean {sample * 100:g}%?)" if isinstance(sample, float) and 0 < sample < 1 else ""
        raise ValueError(f"sample must be a count of rows (e.g. 1000) or a percentage (e.g. 10%), "
                         f"got {sample!r}{hint}")
    if sample < 1:
        raise ValueError(f"a sample count must be at least 1, got {sample}")
    return min(total, sample)


def describe_sample(sample: int | str) -> str:
    """What an audit was asked to sample, as its report says it."""
    text = str(sample).strip()
    return f"asked for {text} of the rows" if text.endswith("%") else f"asked for {int(text):,} rows"


def sample_rows(files: list[ArchiveFile], sample: int | str, seed: int) -> list[FileSelection]:
    """A seeded sample of rows, stratified by file (see the module docstring)."""
    readable = [f for f in files if f.error is None and f.rows > 0]
    counts = np.array([f.rows for f in readable], dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return []
    n = sample_size(sample, total)
    quotas = n * counts / total
    allocation = np.floor(quotas).astype(np.int64)
    remainder = n - int(allocation.sum())
    allocation[np.argsort(-(quotas - allocation), kind="stable")[:remainder]] += 1
    rng = np.random.default_rng(seed)
    selections = []
    for file, count, take in zip(readable, counts, allocation):
        if take:
            rows = np.sort(rng.choice(int(count), size=int(take), replace=False))
            selections.append(FileSelection(file.path, tuple(int(r) for r in rows)))
    return selections


def all_rows(files: list[ArchiveFile]) -> list[FileSelection]:
    return [FileSelection(f.path) for f in files if f.error is None and f.rows > 0]


def key_rows(files: list[ArchiveFile], keys: frozenset[str]) -> list[FileSelection]:
    """The files whose key range can hold one of ``keys``: the only ones a restore of those
    keys opens (:func:`read_selected` with ``keys`` then reads, of each, the row groups
    that can hold them, and their records only where a key is there)."""
    wanted = sorted(keys)
    return [FileSelection(f.path) for f in files
            if f.error is None and f.rows > 0 and range_may_hold(f.keys, wanted)]


def read_selected(selections: list[FileSelection], storage: StorageConfig, keys: frozenset[str] | None = None,
                  columns: list[str] = ROW_COLUMNS) -> ray.data.Dataset:
    """The selected rows as a Dataset (one read task per file), with ``archive_file`` and
    ``archive_row`` saying where each row lives and ``torch_threads`` the thread count its
    file's encoder ran with (None: not recorded); ``keys`` keeps only rows with those keys
    (select the files with :func:`key_rows`)."""
    items = pa.table({"path": [s.path for s in selections],
                      "rows": pa.array([list(s.rows) if s.rows is not None else None for s in selections],
                                       pa.list_(pa.int64()))})
    read = partial(_read_file_rows, storage=storage, keys=tuple(sorted(keys)) if keys is not None else None,
                   columns=columns)
    blocks = [items.slice(i, 1) for i in range(items.num_rows)] or [items]
    return ray.data.from_arrow(blocks).map_batches(read, batch_format="pyarrow", batch_size=1)


def _read_file_rows(batch: pa.Table, storage: StorageConfig, keys: tuple[str, ...] | None,
                    columns: list[str]) -> pa.Table:
    """The selected rows of each file of a block, reading only the row groups that hold
    them (sampled positions, or keys: ``archive.read_data_file_rows``, which keeps only the
    rows of those keys)."""
    tables = []
    for path, rows in zip(batch["path"].to_pylist(), batch["rows"].to_pylist()):
        fs, stripped = filesystem(path, storage)
        try:
            table, positions = with_retries(lambda: read_data_file_rows(stripped, fs, columns, rows, keys), storage,
                                            f"read {path}")
        except Exception as error:  # noqa: BLE001 - reported as a row, like any other finding
            tables.append(_unreadable_file_row(path, f"unreadable archive file: {type(error).__name__}: {error}",
                                               columns))
            continue
        threads = _torch_threads((table.schema.metadata or {}).get(THREADS_KEY.encode()))
        table = table.append_column("archive_file", pa.array([path] * table.num_rows, pa.string()))
        table = table.append_column("archive_row", positions)
        tables.append(table.append_column("torch_threads", pa.array([threads] * table.num_rows, pa.int32())))
    return pa.concat_tables(tables)


def split_file_rows(table: pa.Table) -> tuple[pa.Table, dict[str, str]]:
    """Split the rows that stand for unreadable data files off a stage's output.

    A file whose footer reads but whose pages do not (a failed page checksum, a damaged
    page) is found only when a task reads it, and comes back as one row keyed ``#file``;
    whatever stage it passed through, it is a file finding, not a record's. Returns the
    other rows, and each such file's path with its error.
    """
    stands_for_file = pc.fill_null(pc.and_(pc.equal(table["key"], UNREADABLE_FILE_KEY),
                                           pc.equal(table["archive_row"], -1)), False)
    failed = table.filter(stands_for_file)
    return table.filter(pc.invert(stands_for_file)), dict(zip(failed["archive_file"].to_pylist(),
                                                             failed["error"].to_pylist()))


def with_read_failures(files: list[ArchiveFile], failures: dict[str, str]) -> list[ArchiveFile]:
    """The files, those that failed when read marked unreadable with their error; their row
    count stays the footer's: the rows the archive lost."""
    return [dataclasses.replace(f, error=failures[f.path]) if f.error is None and f.path in failures else f
            for f in files]


def _unreadable_file_row(path: str, error: str, columns: list[str]) -> pa.Table:
    """One row standing for a data file whose rows cannot be read (key ``#file``, row -1)."""
    schema = pa.schema([SCHEMA.field(name) for name in columns])
    values = {name: [None] for name in columns} | {"key": [UNREADABLE_FILE_KEY], "error": [error]}
    table = pa.Table.from_pydict(values, schema=schema)
    return (table.append_column("archive_file", pa.array([path])).append_column("archive_row", pa.array([-1]))
            .append_column("torch_threads", pa.array([None], pa.int32())))


def _torch_threads(value: bytes | None) -> int | None:
    """The encoder's thread count a file's footer records (untrusted: None unless a count a
    writer writes); None for files written before it was recorded."""
    try:
        threads = int(value) if value is not None else None
    except ValueError:
        return None
    return threads if threads is not None and 1 <= threads <= MAX_TORCH_THREADS else None

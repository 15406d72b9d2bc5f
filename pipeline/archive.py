"""The archive: a Parquet dataset of compressed records, its schema, writer and reader.

The schema (docs/archive.md) is versioned and self-contained: pyarrow, DuckDB or Spark can
read an archive without this project, and each file's key-value metadata names the model
and the job's config and summarizes the file's rows (pipeline.file_summary), so that the
archive's summary reads footers, not rows. The archive is also the job's checkpoint: a
file appears under its final name only once it is complete (written under a hidden
temporary name, then renamed; object stores make the upload itself atomic), so on a rerun every key found in a
readable file is done and is skipped, and a half-written file from a crash is invisible
(hidden names are ignored by Parquet readers) and is cleaned up.

Every data page carries a CRC-32 (Parquet page checksums), and every read of a data file
verifies them (:func:`read_data_file`): a record has its own checksum, but a key, a size or
an error text silently changed on disk would otherwise be read as if it were true.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import logging
import posixpath
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor
from ray.data._internal.execution.interfaces import TaskContext

from pipeline.errors import is_retryable
from pipeline.file_summary import SUMMARY_COLUMNS, SUMMARY_KEY, FileSummary
from pipeline.storage import StorageConfig, filesystem, with_retries

# 2: the codec column (a record may be a standard codec's file: corrdiff.floor) and the
# floor's measures. Files of version 1 have no codec column and hold CorrDiff records only:
# read_data_file gives them one.
ARCHIVE_SCHEMA_VERSION = "2"
# How keys are formed (pipeline/sources.py), written into every data file as
# "corrdiff.key_scheme". 2: tar members are "<shard path>.tar/<member>". Before it (files
# without the entry): "<shard path without .tar>/<member>", under which the shards a.tar
# (member b/x.jpg) and a/b.tar (member x.jpg) gave one key. Keys of the other kinds are
# the same in both. A resume must not mix them: see :func:`done_keys`.
KEY_SCHEME = "2"

SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("source_uri", pa.string(), nullable=False),
    pa.field("source_bytes", pa.int64()),
    pa.field("source_sha256", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("record", pa.binary()),
    pa.field("codec", pa.string()),
    pa.field("codec_setting", pa.int16()),
    pa.field("record_bytes", pa.int64()),
    pa.field("bpp", pa.float64()),
    pa.field("psnr", pa.float64()),
    pa.field("lpips", pa.float64()),
    pa.field("model_id", pa.string()),
    pa.field("format_version", pa.int16()),
    pa.field("gammas", pa.list_(pa.float32())),
    pa.field("steps", pa.int16()),
    pa.field("encode_seconds", pa.float64()),
    pa.field("error", pa.string()),
    pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("job_id", pa.string(), nullable=False),
])

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Rows per row group of a data file: a key lookup reads one group (64 records, some MB for
# photos), and the footer keeps each group's statistics (about 25 KB for a file of 1000 rows).
ROW_GROUP_ROWS = 64

# The encode actors' torch thread count, in each data file's metadata: oneDNN's float
# results can depend on it (docs/method.md, "Reproducible pixels"), so restores of the
# file's records run with it and reproduce the encoder's pixels on the same CPU kind.
THREADS_KEY = "corrdiff.torch_threads"
MAX_TORCH_THREADS = 256  # a recorded count above it is not one a writer wrote
FOOTER_THREADS = 16  # footers read at once (per_data_file): storage round trips on object stores

TEMP_PREFIX = ".tmp-"  # a file being written; hidden from readers, removed by clean_incomplete


def is_data_file(path: str) -> bool:
    """Archive data files: Parquet files not hidden ('.') or internal ('_'), as readers see them."""
    name = posixpath.basename(path)
    return name.endswith(".parquet") and not name.startswith((".", "_"))


@dataclass(frozen=True)
class WrittenFile:
    path: str
    rows: int


class ArchiveDatasink(Datasink[WrittenFile]):
    """Writes each write task's rows as one Parquet file, atomically, with archive metadata."""

    def __init__(self, url: str, storage: StorageConfig, metadata: dict[str, str], job_id: str,
                 rows_per_file: int, on_written: Callable[[str, pa.Table], None] | None = None) -> None:
        self.url, self.storage, self.job_id = url.rstrip("/"), storage, job_id
        self.rows_per_file = rows_per_file
        self.on_written = on_written  # told (file name, rows) once a file is committed: pipeline.shards
        self.schema = SCHEMA.with_metadata({**metadata, "corrdiff.archive_schema": ARCHIVE_SCHEMA_VERSION,
                                            "corrdiff.key_scheme": KEY_SCHEME})

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def on_write_start(self, schema: pa.Schema | None = None) -> None:
        fs, root = filesystem(self.url, self.storage)
        fs.makedirs(root, exist_ok=True)

    def write(self, blocks: Iterable[Block], ctx: TaskContext) -> WrittenFile:
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return WrittenFile("", 0)
        table = pa.concat_tables([t.select(SCHEMA.names).cast(SCHEMA) for t in tables]).replace_schema_metadata(
            self.schema.metadata)
        fs, root = filesystem(self.url, self.storage)
        final = write_data_file(fs, root, self.job_id, table, self.storage)
        if self.on_written is not None:
            self.on_written(posixpath.basename(final), table)
        return WrittenFile(fs.unstrip_protocol(final), table.num_rows)


def data_file_name(job_id: str, table: pa.Table) -> str:
    """``part-<job>-<keys hash>.parquet``: named by the keys it holds, so that a write task
    Ray retries after its rename (its worker died before reporting) writes the same keys
    under the same name, replacing its own file instead of adding a second copy of every row."""
    keys = hashlib.sha256("\0".join(sorted(table.column("key").to_pylist())).encode()).hexdigest()[:16]
    return f"part-{job_id}-{keys}.parquet"


def write_data_file(fs: AbstractFileSystem, root: str, job_id: str, table: pa.Table, storage: StorageConfig) -> str:
    """Write ``table`` as a data file of the archive at ``root`` (:func:`data_file_name`),
    atomically: a hidden name first, then a rename. Returns its path."""
    name = data_file_name(job_id, table)
    final = posixpath.join(root, name)
    temp = posixpath.join(root, f"{TEMP_PREFIX}{uuid.uuid4().hex[:8]}-{name}")  # one per attempt
    data = data_file_bytes(table)
    with_retries(lambda: fs.pipe_file(temp, data), storage, f"write {temp}")
    with_retries(lambda: fs.mv(temp, final), storage, f"rename {temp}")
    return final


def data_file_bytes(table: pa.Table) -> bytes:
    """A data file's bytes: rows sorted by key in row groups of :data:`ROW_GROUP_ROWS`, zstd
    pages, each with its CRC-32 (checked by :func:`read_data_file`). The key column's
    min/max per row group (Parquet statistics, in the footer) then tell a reader which row
    group can hold a key (:func:`read_data_file_rows`), so a restore of a few keys reads
    footers and a few row groups, not the archive. The footer also carries the summary of
    the rows (``corrdiff.summary``, pipeline.file_summary), computed here and so never
    stale: a table read from another file (a rewrite) brings that file's, which is replaced."""
    present = [c for c in SUMMARY_COLUMNS if c in table.column_names]
    summary = FileSummary.of_rows(_as_current(table.select(present), SUMMARY_COLUMNS,
                                              [c for c in SUMMARY_COLUMNS if c not in present]))
    metadata = {**(table.schema.metadata or {}), SUMMARY_KEY.encode(): summary.to_json().encode()}
    buffer = io.BytesIO()
    pq.write_table(table.sort_by("key").replace_schema_metadata(metadata), buffer, compression="zstd",
                   write_page_checksum=True, row_group_size=ROW_GROUP_ROWS)
    return buffer.getvalue()


def read_data_file(path: str, fs: AbstractFileSystem, columns: list[str] | None) -> pa.Table:
    """Columns (None: all, as stored) of one data file, every page's checksum verified: a
    damaged page raises (``OSError``) instead of being read as data. Files written before
    page checksums existed have none to verify and read as before.

    Columns asked for that a file of an older schema version lacks are read as what they
    mean there (:func:`_as_current`): a version 1 file's records are all CorrDiff's."""
    if columns is None:
        return pq.read_table(path, filesystem=fs, page_checksum_verification=True)
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle, page_checksum_verification=True)
        read, missing = _columns_to_read(parquet, columns)
        table = parquet.read(columns=read)
    return _as_current(table, columns, missing)


def _columns_to_read(parquet: pq.ParquetFile, columns: list[str] | None) -> tuple[list[str] | None, list[str]]:
    """The columns to read of a file for ``columns``, and those of them it lacks (a file of an
    older schema version): what :func:`_as_current` needs to make them (``error``) is read."""
    if columns is None:
        return None, []
    present = set(parquet.schema_arrow.names)
    missing = [c for c in columns if c not in present]
    return [c for c in columns if c in present] + (["error"] if missing and "error" not in columns else []), missing


def _as_current(table: pa.Table, columns: list[str] | None, missing: list[str]) -> pa.Table:
    """A table read from a file of an older schema version, with the columns it lacks:
    ``codec`` is ``corrdiff`` for every record (error rows: null), as each was; the floor's
    columns (``lpips``, ``codec_setting``) are null: nothing measured or chose them."""
    if not missing or columns is None:
        return table
    ok = pc.is_null(table["error"])
    values = {name: table[name] for name in table.column_names}
    for name in missing:
        field = SCHEMA.field(name)  # a name that no schema version has raises KeyError
        values[name] = pc.if_else(ok, pa.scalar("corrdiff"), pa.scalar(None, pa.string())) if name == "codec" \
            else pa.nulls(table.num_rows, field.type)
    # Each field as the file has it (a key stays non-nullable), so that tables of both versions concatenate.
    schema = pa.schema([table.schema.field(name) if name in table.column_names else SCHEMA.field(name)
                        for name in columns], metadata=table.schema.metadata)
    return pa.table([values[name] for name in columns], schema=schema)


def read_data_file_rows(path: str, fs: AbstractFileSystem, columns: list[str] | None,
                        rows: Sequence[int] | None = None,
                        keys: Sequence[str] | None = None) -> tuple[pa.Table, pa.Array]:
    """Some rows of one data file, and their positions in it: ``rows`` (sorted positions;
    None: all) and, where ``keys`` (sorted) is given, only the rows that hold one of them.

    It reads as little as it can: only the row groups that hold a wanted position and
    whose key range (footer statistics, :func:`range_may_hold`) can hold a key; of those,
    with ``keys``, the key column first, and the asked-for columns (the records) only of
    the groups where a key is really there. Page checksums verified, and columns of older
    schema versions made, as :func:`read_data_file`. Files written before sorted row groups
    (one row group, any order) have a wide range: their key column is read, their records
    only if they hold a key."""
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle, page_checksum_verification=True)
        metadata = parquet.metadata
        key_column = _column_index(metadata, "key")
        wanted = np.asarray(rows if rows is not None else [], dtype=np.int64)
        groups, positions, start = [], [], 0
        for index in range(metadata.num_row_groups):
            count = metadata.row_group(index).num_rows
            span = np.arange(start, start + count, dtype=np.int64)
            if rows is not None:
                span = span[np.isin(span, wanted)]
            if len(span) and (keys is None or range_may_hold(_key_range(metadata.row_group(index), key_column), keys)):
                groups.append(index)
                positions.append(span - start)
            start += count
        if keys is not None and groups:
            groups, positions = _holding(parquet, groups, positions, keys)
        read, missing = _columns_to_read(parquet, columns)
        table = parquet.read_row_groups(groups, columns=read) if groups else parquet.schema_arrow.empty_table()
    if read is not None and not groups:
        table = table.select(read)
    # Positions within the groups read, then in the file.
    starts = np.cumsum([0] + [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)])
    offsets = np.cumsum([0] + [metadata.row_group(g).num_rows for g in groups[:-1]]).astype(np.int64)
    take = np.concatenate([local + offset for local, offset in zip(positions, offsets)]) if groups else []
    found = np.concatenate([local + starts[g] for local, g in zip(positions, groups)]) if groups else []
    return _as_current(table.take(pa.array(take, pa.int64())), columns, missing), pa.array(found, pa.int64())


def _holding(parquet: pq.ParquetFile, groups: list[int], positions: list[np.ndarray],
             keys: Sequence[str]) -> tuple[list[int], list[np.ndarray]]:
    """Of row groups whose range may hold one of ``keys``, those that do, with the positions
    (within each group) of the rows that hold one: read from the key column alone."""
    held = parquet.read_row_groups(groups, columns=["key"])["key"]
    is_wanted = pc.is_in(held, value_set=pa.array(keys, pa.string())).to_numpy(zero_copy_only=False)
    kept_groups, kept_positions, offset = [], [], 0
    for group, local in zip(groups, positions):
        count = parquet.metadata.row_group(group).num_rows
        local = local[is_wanted[offset + local]]
        if len(local):
            kept_groups.append(group)
            kept_positions.append(local)
        offset += count
    return kept_groups, kept_positions


def _column_index(metadata: pq.FileMetaData, name: str) -> int | None:
    """The index of column ``name``, from the row groups' column chunks (None: no row
    groups, or no such column). Not from ``metadata.schema``: that makes a reference cycle
    which keeps the whole footer alive until the garbage collector runs (measured: 100
    footers of 10,000 rows each held 279 MB on a driver that read them one by one)."""
    if not metadata.num_row_groups:
        return None
    row_group = metadata.row_group(0)
    return next((i for i in range(row_group.num_columns) if row_group.column(i).path_in_schema == name), None)


def _key_range(row_group: pq.RowGroupMetaData, key_column: int | None) -> tuple[str, str] | None:
    """The smallest and largest key of a row group (its footer statistics), or None where
    they are not there (a key too long for the writer's statistics)."""
    if key_column is None:
        return None
    statistics = row_group.column(key_column).statistics
    if statistics is None or not statistics.has_min_max:
        return None
    return statistics.min, statistics.max


def key_range(metadata: pq.FileMetaData) -> tuple[str, str] | None:
    """The smallest and largest key of a data file, from its footer's row group statistics;
    None where a row group has none: any key may be in it. Whatever the order of its rows,
    no key outside the range is in the file (a file written before sorted row groups just
    has a wide range)."""
    key_column = _column_index(metadata, "key")
    ranges = [_key_range(metadata.row_group(index), key_column) for index in range(metadata.num_row_groups)]
    if not ranges or None in ranges:
        return None
    return min(low for low, _ in ranges), max(high for _, high in ranges)


def largest_image(metadata: pq.FileMetaData) -> int | None:
    """At least the pixels of the largest image a data file holds: its largest width times
    its largest height, from the footer's row group statistics (sizing the workers that
    restore its records); None where a row group has no statistics of both. A file of error
    rows alone holds no image: 0."""
    columns = [_column_index(metadata, name) for name in ("width", "height")]
    if None in columns:
        return None
    largest = [0, 0]
    for index in range(metadata.num_row_groups):
        row_group = metadata.row_group(index)
        for axis, column in enumerate(columns):
            statistics = row_group.column(column).statistics
            if statistics is not None and statistics.has_min_max:
                largest[axis] = max(largest[axis], int(statistics.max))
            elif not (statistics is not None and statistics.has_null_count
                      and statistics.null_count == row_group.num_rows):  # error rows alone hold no image
                return None
    return largest[0] * largest[1]


def range_may_hold(span: tuple[str, str] | None, keys: Sequence[str]) -> bool:
    """Whether a key range (None: unknown) can hold one of ``keys`` (sorted). Parquet orders
    string statistics by their UTF-8 bytes, which is Python's code-point order."""
    if span is None:
        return True
    low, high = span
    at = bisect.bisect_left(keys, low)
    return at < len(keys) and keys[at] <= high


def list_data_files(url: str, storage: StorageConfig) -> list[str]:
    return sorted(data_file_sizes(url, storage))


def data_file_sizes(url: str, storage: StorageConfig) -> dict[str, int]:
    """Every data file's path and size in bytes, from one listing (no request per file)."""
    fs, root = filesystem(url, storage)
    fs.invalidate_cache(root)  # other processes (the write tasks) add files: never list from a stale cache
    if not fs.exists(root):
        return {}
    return {p: int(info["size"]) for p, info in fs.find(root, detail=True).items() if is_data_file(p)}


def per_data_file(url: str, storage: StorageConfig,
                  read: Callable[[str, AbstractFileSystem], T]) -> Iterator[tuple[str, int, T]]:
    """``read(path, fs)`` of every data file (its footer, as a rule), with the file's path and
    size, in path order: :data:`FOOTER_THREADS` files at a time (each a round trip or two to
    storage for a few KB), generated in bounded batches, so that memory holds a batch of
    results, not one per file, until the caller keeps them."""
    fs, _ = filesystem(url, storage)
    sizes = data_file_sizes(url, storage)
    paths = sorted(sizes)
    batch = 4 * FOOTER_THREADS
    with ThreadPoolExecutor(FOOTER_THREADS) as pool:
        for start in range(0, len(paths), batch):
            chunk = paths[start:start + batch]
            yield from zip(chunk, (sizes[p] for p in chunk), pool.map(lambda p: read(p, fs), chunk))


def file_summaries(url: str, storage: StorageConfig) -> Iterator[tuple[int, FileSummary]]:
    """Each data file's size and the summary of its rows, in path order: the summary from
    its footer (:func:`footer_summary`), footers read in parallel (:func:`per_data_file`)."""
    for _, size, summary in per_data_file(url, storage, lambda path, fs: footer_summary(path, fs, storage)):
        yield size, summary


def footer_summary(path: str, fs: AbstractFileSystem, storage: StorageConfig) -> FileSummary:
    """The summary of a data file's rows: the one in its footer, or, for a file written
    before footers held one (or whose entry is damaged, or does not match its row count:
    a file rewritten by another tool that copied the metadata), computed from its
    :data:`SUMMARY_COLUMNS` (never its records)."""
    metadata = with_retries(lambda: pq.read_metadata(path, filesystem=fs), storage, f"read the footer of {path}")
    text = (metadata.metadata or {}).get(SUMMARY_KEY.encode())
    if text is not None:
        try:
            summary = FileSummary.from_json(text)
            if summary.rows == metadata.num_rows:
                return summary
            logger.warning("%s: its footer summary counts %d rows, the file holds %d: reading its rows instead",
                           path, summary.rows, metadata.num_rows)
        except ValueError as error:
            logger.warning("%s: unusable footer summary (%s): reading its rows instead", path, error)
    table = with_retries(lambda: read_data_file(path, fs, SUMMARY_COLUMNS), storage, f"read {path}")
    return FileSummary.of_rows(table)


def clean_incomplete(url: str, storage: StorageConfig) -> list[str]:
    """Delete temporary files left by a crashed or killed job; return what was removed."""
    fs, root = filesystem(url, storage)
    if not fs.exists(root):
        return []
    stale = [p for p in fs.find(root) if posixpath.basename(p).startswith(TEMP_PREFIX)]
    for path in stale:
        fs.rm(path)
    return stale


def read_columns(url: str, storage: StorageConfig, columns: list[str]) -> pa.Table:
    """Selected columns of every data file (empty table with the schema if none)."""
    fs, _ = filesystem(url, storage)
    files = list_data_files(url, storage)
    if not files:
        return SCHEMA.empty_table().select(columns)
    return pa.concat_tables([read_data_file(path, fs, columns) for path in files])


def done_keys(url: str, storage: StorageConfig) -> set[str]:
    """Keys already in the archive, the resume point of a rerun: every key with a row,
    except those whose only rows are retryable errors (pipeline.errors), tried again.

    Refused (``ValueError``) if a data file's keys were formed otherwise than this version
    forms them (:data:`KEY_SCHEME`): a rerun would archive its images a second time under
    new keys, and say nothing.
    """
    return {key for key, _ in _done_rows(url, storage, with_uris=False)}


def done_keys_by(url: str, storage: StorageConfig, group: Callable[[str, str], str | None]) -> dict[str, set[str]]:
    """The keys of :func:`done_keys`, grouped by ``group(key, source_uri)``; a key whose
    group is None is left out. A rerun over shards (pipeline.shards) groups by shard and
    keeps only the shards it reads, so that memory holds their keys, not the archive's, and
    each shard's reader gets its own."""
    grouped: dict[str, set[str]] = {}
    for key, uri in _done_rows(url, storage, with_uris=True):
        name = group(key, uri)
        if name is not None:
            grouped.setdefault(name, set()).add(key)
    return grouped


def _done_rows(url: str, storage: StorageConfig, with_uris: bool) -> Iterator[tuple[str, str | None]]:
    """(key, source_uri or None) of each row that is not a retryable error, a file at a time."""
    fs, _ = filesystem(url, storage)
    for path in list_data_files(url, storage):
        table = read_data_file(path, fs, ["key", "error"] + (["source_uri"] if with_uris else []))
        check_key_scheme(table.schema.metadata or {}, fs.unstrip_protocol(path))
        uris = table["source_uri"].to_pylist() if with_uris else [None] * table.num_rows
        yield from ((key, uri) for key, error, uri in zip(table["key"].to_pylist(), table["error"].to_pylist(), uris)
                    if not is_retryable(error))


def check_key_scheme(metadata: dict[bytes, bytes], path: str) -> None:
    """Refuse to resume over a data file whose keys this version would form differently."""
    scheme = metadata.get(b"corrdiff.key_scheme", b"").decode() or None
    try:
        kind = (json.loads(metadata.get(b"corrdiff.config", b"{}")).get("input") or {}).get("kind")
    except (ValueError, AttributeError):
        kind = None  # not written by this project: nothing says its keys would change
    if scheme is None and kind == "tar":
        raise ValueError(
            f"{path} was written before key scheme {KEY_SCHEME}: its tar members are keyed "
            "'<shard without .tar>/<member>', which this version writes as '<shard>.tar/<member>'; "
            "resuming would archive every member again under its new key. Finish this archive with "
            "the version that started it, or write a new archive (docs/archive.md#keys-and-resume)"
        )
    if scheme is not None and scheme != KEY_SCHEME:
        raise ValueError(f"{path} has key scheme {scheme}, this version writes {KEY_SCHEME}: resume it "
                         "with the version that wrote it")


def file_metadata(path: str, storage: StorageConfig) -> dict[str, str]:
    fs, _ = filesystem(path, storage)
    with fs.open(path, "rb") as handle:
        metadata = pq.read_schema(handle).metadata or {}
    return {k.decode(): v.decode() for k, v in metadata.items()}


def job_metadata(model_name: str, model_id: str, config: dict, job_id: str) -> dict[str, str]:
    return {
        "corrdiff.model_name": model_name,
        "corrdiff.model_id": model_id,
        "corrdiff.job_id": job_id,
        "corrdiff.config": json.dumps(config, sort_keys=True, default=str),
    }

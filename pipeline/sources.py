"""Where the images come from: listed in tasks (pipeline.listing), the bytes fetched in tasks.

Four kinds of source (docs/sources.md): a folder or prefix of image files, a manifest of
URIs, WebDataset tar shards, and Parquet files with a binary image column. Each becomes
one Ray Dataset with the columns key, source_uri, data and error, one row per input image.

Keys. A key names one image for good: the archive stores it, a rerun skips what is already
archived by key (pipeline.pending, pipeline.shards), and an audit finds the original by key years later. So a key
depends only on where the image sits inside the source, never on the bucket, the mount
point or the time of the run, and it is unique within the source:
- files: the path relative to the folder/prefix, with '/' separators ("sub/a.jpg");
- manifest: the manifest's key column if it has one, else the URI as written (a manifest
  that names a key twice is refused: pipeline.pending);
- tar: "<shard path relative to the prefix>/<member name>", the shard's ".tar" kept
  ("train/shard-000001.tar/000001.jpg"): the shard ends at the key's first segment ending
  in ".tar" (case-insensitive), so shards a.tar (member b/x.jpg) and a/b.tar (member x.jpg)
  keep two keys. That needs no shard under a folder whose name ends in ".tar": such a
  listing is refused. (Archives written before KEY_SCHEME 2, pipeline/archive.py, keyed
  members "<shard path without .tar>/<member>"; a rerun over one is refused.)
- parquet: the value of the key column (the input must keep it unique across its files:
  checking that would take a pass over all the data before the first image).
`source_uri` says where the bytes were read, for people and audits: the full URL
("s3://bucket/prefix/sub/a.jpg", "/abs/path/a.jpg"), for a tar member
"<shard url>#<member name>", for a Parquet row "<file url>#<key>" (:func:`split_tar_uri`,
:func:`split_parquet_uri` take them apart again).

Listed objects are read by the filesystem and path the listing produced, never by
re-parsing their URL: fsspec reads "::" in a URL as a chain of filesystems, so a file named
"a::b.png" would be read as "a". Only a manifest's URIs, written by a person, are fsspec URLs.

Failures are rows, not crashes: an image that cannot be read is a row with data null and
error set, so that a job over millions of objects finishes and says what it missed. A
corrupt or truncated tar shard yields the members read before the damage, then one row
keyed "<shard key>/#shard" with error "corrupt tar shard: <reason>"; Parquet files
likewise end with "<file path without .parquet>/#file" and "corrupt parquet file: <reason>".
An image larger than ``SourceConfig.max_image_bytes`` is an error row "image file too large:
..." whose bytes are never read: the size is known first (the object's size, the tar
member's header, the Parquet cell's length).

Skipped is said, not silent: the files under the prefix and the tar members that the
extension filter leaves out are counted by extension, with a few names (:class:`Skipped`),
and the compress job's summary reports them.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import IO, TYPE_CHECKING, Literal

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from pipeline.images import IMAGE_EXTENSIONS  # noqa: F401  (defined beside the decoder, re-exported here)
from pipeline.errors import retryable
from pipeline.listing import ImageListing, few, list_manifest, list_prefix
from pipeline.pending import PendingImages
from pipeline.skipped import Skipped
from pipeline.storage import StorageConfig, filesystem, is_transient, with_retries

if TYPE_CHECKING:
    from ray.actor import ActorHandle

SourceKind = Literal["files", "tar", "parquet", "manifest"]
SHARD_KINDS = ("tar", "parquet")  # the source kinds read (and resumed) shard by shard: pipeline.shards

OUTPUT_SCHEMA = pa.schema(
    [("key", pa.string()), ("source_uri", pa.string()), ("data", pa.binary()), ("error", pa.string())]
)

SHARD_ERROR_SUFFIX = "#shard"
FILE_ERROR_SUFFIX = "#file"
_FETCH_THREADS = 16  # concurrent reads per block: object stores are latency-bound
_TAR_BLOCK = 512
# The largest encoded image read, per file, tar member or Parquet cell. An image within the
# pixel limit (100 Mpx) is at most 800 MB uncompressed (16-bit RGBA; a 100 Mpx 16-bit RGB
# TIFF is 600 MB), so 1 GiB refuses no image the decoder would accept, while bounding what
# one row can make a worker hold. Lower it for collections of ordinary photos.
DEFAULT_MAX_IMAGE_BYTES = 1 << 30

Row = tuple[str, str, bytes | None, str | None]  # key, source_uri, data, error


@dataclass(frozen=True)
class SourceConfig:
    """What to read and how its records are laid out."""

    url: str  # folder/prefix (files, tar, parquet) or the manifest file
    kind: SourceKind = "files"
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS  # files + tar members; case-insensitive
    key_column: str = "key"  # parquet input
    image_column: str = "image"  # parquet input: binary column of encoded image bytes
    uri_column: str = "uri"  # manifest given as CSV/Parquet; a .txt manifest is one URI per line
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES  # larger files, members, cells: error rows, never read

    def __post_init__(self) -> None:
        if self.max_image_bytes < 1:
            raise ValueError(f"max_image_bytes must be at least 1, not {self.max_image_bytes}")


@dataclass(frozen=True)
class Listing:
    """The shards of a tar or Parquet source, held by the driver: one row per shard
    (:data:`pipeline.listing.LISTING_SCHEMA`), the files skipped, and the filesystem whose
    paths the rows hold."""

    items: pa.Table
    skipped: Skipped
    filesystem: fsspec.AbstractFileSystem


@dataclass(frozen=True)
class SourceRead:
    """A source's Dataset and what was skipped on the way to it.

    Tar members are met only by the tasks that read the shards; those report them to
    ``member_tally`` (an actor), so :meth:`skipped` has them once the dataset has run.
    """

    dataset: ray.data.Dataset
    listed_skipped: Skipped
    member_tally: ActorHandle | None = None

    def skipped(self) -> Skipped:
        """What the listing skipped, plus the tar members skipped by the readers so far."""
        total = Skipped()
        total.merge(self.listed_skipped)
        if self.member_tally is not None:
            total.merge(ray.get(self.member_tally.total.remote()))
        return total


@ray.remote(num_cpus=0)
class _MemberTally:
    """The skipped tar members of each shard, as its reading task reports them. Kept per
    shard, so that a retried task replaces its shard's count instead of adding to it."""

    def __init__(self) -> None:
        self._shards: dict[str, Skipped] = {}

    def record(self, shard_key: str, skipped: Skipped) -> None:
        self._shards[shard_key] = skipped

    def total(self) -> Skipped:
        total = Skipped()
        for shard_key in sorted(self._shards):
            total.merge(self._shards[shard_key])
        return total


def list_images(source: SourceConfig, storage: StorageConfig) -> ImageListing:
    """The images of a files or manifest source, listed in tasks (pipeline.listing)."""
    if source.kind == "files":
        return list_prefix(source.url, storage, _lower(source.extensions), "images")
    if source.kind == "manifest":
        return list_manifest(source.url, storage, source.uri_column, source.key_column)
    raise ValueError(f"{source.kind!r} is not a source of single images (files, manifest): list its shards")


def list_shards(source: SourceConfig, storage: StorageConfig) -> Listing:
    """The shards of a tar or Parquet source (one row per shard or file, key = its path
    relative to the prefix), sorted by key: listed in tasks, then held by the driver (a
    collection has thousands of shards where it has millions of images)."""
    if source.kind not in SHARD_KINDS:
        raise ValueError(f"unknown source kind {source.kind!r}; expected one of files, manifest, "
                         f"{', '.join(SHARD_KINDS)}")
    found = list_prefix(source.url, storage, (f".{source.kind}",), "tar shards" if source.kind == "tar"
                        else "Parquet files")
    listing = Listing(pa.concat_tables(ray.get(found.blocks)).sort_by("key"), found.skipped, found.filesystem)
    if source.kind == "tar":
        _check_tar_shards(listing)
    else:
        _check_parquet_files(listing, source, storage)
    return listing


def read_images(pending: PendingImages, source: SourceConfig, storage: StorageConfig,
                rows_per_block: int = 64) -> SourceRead:
    """A Dataset of (key, source_uri, data, error), one row per pending image, fetched
    ``rows_per_block`` at a time (16 reads at once per task)."""
    if rows_per_block < 1:
        raise ValueError(f"rows_per_block must be at least 1, not {rows_per_block}")
    if not pending.blocks:
        return SourceRead(ray.data.from_arrow(OUTPUT_SCHEMA.empty_table()), pending.skipped)
    fetch = partial(_fetch_batch, fs=pending.filesystem, storage=storage, max_bytes=source.max_image_bytes)
    dataset = ray.data.from_arrow_refs(pending.blocks).map_batches(fetch, batch_format="pyarrow",
                                                                    batch_size=rows_per_block)
    return SourceRead(dataset, pending.skipped)


def read_shards(
    source: SourceConfig,
    storage: StorageConfig,
    listing: Listing,
    rows_per_block: int = 64,
    ledger: ActorHandle | None = None,
) -> SourceRead:
    """A Dataset of (key, source_uri, data, error), one row per image of the listed tar or
    Parquet shards; a shard whose listing row has a ``done`` column (its keys already
    archived: pipeline.shards.with_done_keys) leaves those out as it is expanded, before
    their bytes leave the task. ``ledger``: a :class:`pipeline.shards.ShardLedger` told how
    many rows each shard gave once its reader reaches the shard's end."""
    if rows_per_block < 1:
        raise ValueError(f"rows_per_block must be at least 1, not {rows_per_block}")
    common = {"fs": listing.filesystem, "source": source, "storage": storage, "rows_per_block": rows_per_block,
              "ledger": ledger}
    if source.kind == "tar":
        tally = _MemberTally.remote()
        tables_of = partial(_tar_tables, tally=tally, **common)
    else:
        tally, tables_of = None, partial(_parquet_tables, **common)
    if listing.items.num_rows == 0:
        return SourceRead(ray.data.from_arrow(OUTPUT_SCHEMA.empty_table()), listing.skipped, tally)
    dataset = _blocks(listing.items, 1).map_batches(partial(_expand, tables_of=tables_of),
                                                    batch_format="pyarrow", batch_size=1)
    return SourceRead(dataset, listing.skipped, tally)


# Checking a shard listing ----------------------------------------------------------------


def _check_tar_shards(listing: Listing) -> None:
    """Refuse shards under a folder named "*.tar", where their members' keys could not say
    where the shard ends (see the module docstring)."""
    nested = [key for key in listing.items["key"].to_pylist()
              if any(segment.lower().endswith(".tar") for segment in key.split("/")[:-1])]
    if nested:
        raise ValueError(
            f"tar shards under a folder whose name ends in .tar: {few(nested)}; a member's key "
            "<shard>.tar/<member> must show where the shard ends: rename the folder"
        )


def _check_parquet_files(listing: Listing, source: SourceConfig, storage: StorageConfig) -> None:
    """One footer read catches a wrong column name before the job starts; a later file
    that differs is reported by its task as a '#file' error row."""
    first_uri, path = listing.items["source_uri"][0].as_py(), listing.items["path"][0].as_py()
    schema = with_retries(lambda: pq.read_schema(path, filesystem=listing.filesystem), storage,
                          f"read the schema of {first_uri}")
    _check_parquet_schema(schema, source, first_uri)


def _blocks(listing: pa.Table, rows_per_block: int) -> ray.data.Dataset:
    """The listing as Ray blocks of rows_per_block rows, so that reads spread over tasks.

    Sliced on the driver (zero-copy): a repartition step would be one more task holding a
    CPU, which on a small cluster keeps the encode actors from starting.
    """
    slices = [listing.slice(start, rows_per_block) for start in range(0, listing.num_rows, rows_per_block)]
    return ray.data.from_arrow(slices or [listing])


# Fetching whole objects (files, manifest) ------------------------------------------------


def _fetch_batch(batch: pa.Table, fs: fsspec.AbstractFileSystem | None, storage: StorageConfig,
                 max_bytes: int) -> pa.Table:
    """Every object of a block, read concurrently; a failed read becomes an error row."""
    uris = batch["source_uri"].to_pylist()
    fetch = partial(_fetch_one, fs=fs, storage=storage, max_bytes=max_bytes)
    with ThreadPoolExecutor(max_workers=max(1, min(_FETCH_THREADS, len(uris)))) as pool:
        fetched = list(pool.map(fetch, uris, batch["path"].to_pylist()))
    return _output_table(
        batch["key"].to_pylist(), uris, [data for data, _ in fetched], [error for _, error in fetched]
    )


def _fetch_one(uri: str, path: str | None, fs: fsspec.AbstractFileSystem | None, storage: StorageConfig,
               max_bytes: int) -> tuple[bytes | None, str | None]:
    """One object's bytes, its size checked before they are read; or the reason why not.

    A listed object is read at its ``path`` on the listing's ``fs``; a manifest's URI
    (``path`` None) is resolved as the fsspec URL its author wrote.
    """
    try:
        if path is None:
            fs, path = filesystem(uri, storage)
        return read_capped(fs, path, uri, storage, max_bytes), None
    except ImageTooLarge as error:
        return None, str(error)
    except Exception as error:  # one unreadable object must not drop its block
        return None, _damage("read failed", error)


class ImageTooLarge(ValueError):
    """An image whose encoded bytes are over ``max_image_bytes`` (they are not read)."""

    def __init__(self, size: int, max_bytes: int) -> None:
        super().__init__(f"image file too large: {size:,} bytes, over max_image_bytes ({max_bytes:,})")


def read_capped(fs: fsspec.AbstractFileSystem, path: str, uri: str, storage: StorageConfig, max_bytes: int) -> bytes:
    """One object's bytes, its size checked before they are read (:class:`ImageTooLarge`)."""
    size = with_retries(lambda: fs.size(path), storage, f"stat {uri}")
    if size is not None and size > max_bytes:
        raise ImageTooLarge(size, max_bytes)
    # Bounded even when the size is unknown or the object grew since it was measured.
    data = with_retries(lambda: fs.cat_file(path, start=0, end=max_bytes + 1), storage, f"read {uri}")
    if len(data) > max_bytes:
        raise ImageTooLarge(len(data), max_bytes)
    return data


def _too_large(size: int, max_bytes: int) -> str:
    """The error of an image whose encoded bytes are over the cap (they are not read)."""
    return str(ImageTooLarge(size, max_bytes))


def _damage(kind: str, error: BaseException) -> str:
    """The error text for an input that could not be read: retryable (pipeline.errors) when
    storage failed for a passing reason and outlived the retries, final otherwise."""
    if is_transient(error):
        return retryable("read failed", _reason(error))
    return f"{kind}: {_reason(error)}"


def _reason(error: BaseException) -> str:
    """A short, stable reason for the error column (with retry notes when there were any)."""
    if isinstance(error, FileNotFoundError):
        reason = "not found"
    elif isinstance(error, PermissionError):
        reason = "permission denied"
    else:
        reason = f"{type(error).__name__}: {error}"
    return "; ".join([reason, *getattr(error, "__notes__", [])])


def _output_table(
    keys: list[str], uris: list[str], data: list[bytes | None], errors: list[str | None]
) -> pa.Table:
    return pa.Table.from_arrays(
        [pa.array(keys, pa.string()), pa.array(uris, pa.string()), pa.array(data, pa.binary()),
         pa.array(errors, pa.string())],
        schema=OUTPUT_SCHEMA,
    )


def _in_tables(rows: Iterable[Row], rows_per_block: int) -> Iterator[pa.Table]:
    """Rows gathered into tables of at most rows_per_block rows, so memory stays bounded."""
    pending: list[Row] = []
    for row in rows:
        pending.append(row)
        if len(pending) == rows_per_block:
            yield _rows_table(pending)
            pending = []
    if pending:
        yield _rows_table(pending)


def _rows_table(rows: list[Row]) -> pa.Table:
    keys, uris, data, errors = (list(column) for column in zip(*rows))
    return _output_table(keys, uris, data, errors)


# Expanding shards and files (tar, parquet) -------------------------------------------------


def _expand(batch: pa.Table,
            tables_of: Callable[[str, str, str, frozenset[str]], Iterator[pa.Table]]) -> Iterator[pa.Table]:
    """The output tables of each listed shard or file (key, uri, path, and the keys of it
    already done) in a block, as they stream."""
    empty = True
    done = batch["done"].to_pylist() if "done" in batch.column_names else [()] * batch.num_rows
    for key, uri, path, keys in zip(batch["key"].to_pylist(), batch["source_uri"].to_pylist(),
                                    batch["path"].to_pylist(), done):
        for table in tables_of(key, uri, path, frozenset(keys)):
            empty = False
            yield table
    if empty:  # all done already: an empty table keeps the dataset's schema known downstream
        yield OUTPUT_SCHEMA.empty_table()


# Tar shards (WebDataset layout) -------------------------------------------------------------


def _tar_tables(
    shard_key: str, shard_uri: str, shard_path: str, done: frozenset[str], fs: fsspec.AbstractFileSystem,
    source: SourceConfig, storage: StorageConfig, rows_per_block: int, tally: ActorHandle,
    ledger: ActorHandle | None = None,
) -> Iterator[pa.Table]:
    """One shard's rows in tables; then its skipped members, reported to the tally, and its
    row count to the ledger."""
    skipped = Skipped()
    rows = _tar_rows(shard_key, shard_uri, shard_path, fs, source, storage, done, skipped)
    yield from _counted(_in_tables(rows, rows_per_block), shard_key, ledger)
    ray.get(tally.record.remote(shard_key, skipped))  # waited for: the task must not end first


def _counted(tables: Iterator[pa.Table], shard_key: str, ledger: ActorHandle | None) -> Iterator[pa.Table]:
    """``tables``, passed on; at their end the ledger (if any) hears how many rows they held."""
    rows = 0
    for table in tables:
        rows += table.num_rows
        yield table
    if ledger is not None:
        ray.get(ledger.emitted.remote(shard_key, rows))  # waited for: the task must not end first


def _tar_rows(
    shard_key: str, shard_uri: str, shard_path: str, fs: fsspec.AbstractFileSystem, source: SourceConfig,
    storage: StorageConfig, done: frozenset[str], skipped: Skipped,
) -> Iterator[Row]:
    """The image members of one shard (at ``shard_path`` on ``fs``), streamed; damage ends the
    shard with a '#shard' row. Members that are not images are added to ``skipped`` (named
    like their keys, "<shard key>/<member>")."""
    try:
        with with_retries(lambda: fs.open(shard_path, "rb"), storage, f"open {shard_uri}") as handle:
            end = yield from _tar_members(handle, shard_key, shard_uri, source, storage, done, skipped)
            _check_end_of_archive(handle, end, storage, shard_uri)
    except Exception as error:  # corrupt, truncated or unreadable: record it (once), keep the rest
        key = f"{shard_key}/{SHARD_ERROR_SUFFIX}"
        if key not in done:
            yield key, shard_uri, None, _damage("corrupt tar shard", error)


def _tar_members(
    handle: IO[bytes],
    shard_key: str,
    shard_uri: str,
    source: SourceConfig,
    storage: StorageConfig,
    done: frozenset[str],
    skipped: Skipped,
) -> Generator[Row, None, int]:
    """Stream the tar; returns (as the generator's value) the offset where its members end.

    A member name seen before in the same shard is a copy that a key cannot tell apart:
    it becomes an error row keyed "<key>#<n>" rather than a second row under one key. A
    member larger than ``source.max_image_bytes`` (its header says so) is an error row; its
    data is skipped unread, as is every member that is not an image.
    """
    extensions = _lower(source.extensions)
    copies: dict[str, int] = {}
    with tarfile.open(fileobj=_RetryingReader(handle, storage, shard_uri), mode="r|") as archive:
        for member in archive:
            if not member.isfile():
                continue
            if not member.name.lower().endswith(extensions):
                skipped.add(f"{shard_key}/{member.name}")
                continue
            base, uri = f"{shard_key}/{member.name}", f"{shard_uri}#{member.name}"
            copies[base] = copy = copies.get(base, 0) + 1
            key = base if copy == 1 else f"{base}#{copy}"
            if key in done:
                continue  # tarfile skips the unread data
            if copy > 1:
                yield key, uri, None, f"duplicate member name in tar shard (copy {copy})"
            elif member.size > source.max_image_bytes:
                yield key, uri, None, _too_large(member.size, source.max_image_bytes)
            else:
                yield key, uri, archive.extractfile(member).read(), None
        return archive.offset


def _check_end_of_archive(handle: IO[bytes], offset: int, storage: StorageConfig, shard_uri: str) -> None:
    """Python's tarfile ends quietly at a cut between members or at garbage; a zero block must follow."""
    handle.seek(offset)
    block = with_retries(lambda: handle.read(_TAR_BLOCK), storage, f"read {shard_uri}")
    if len(block) < _TAR_BLOCK or block.count(0) != _TAR_BLOCK:
        raise tarfile.ReadError(f"no end-of-archive marker at offset {offset} (truncated or damaged)")


class _RetryingReader:
    """A file's read() with transient errors retried.

    fsspec's buffered files advance their position only after a successful read, so a
    retried read resumes in place and a long shard survives a dropped connection.
    """

    def __init__(self, handle: IO[bytes], storage: StorageConfig, uri: str) -> None:
        self._handle, self._storage, self._what = handle, storage, f"read {uri}"

    def read(self, size: int = -1) -> bytes:
        return with_retries(lambda: self._handle.read(size), self._storage, self._what)


# Parquet files ----------------------------------------------------------------------------


def _parquet_tables(
    file_key: str, file_uri: str, file_path: str, done: frozenset[str], fs: fsspec.AbstractFileSystem,
    source: SourceConfig, storage: StorageConfig, rows_per_block: int, ledger: ActorHandle | None = None,
) -> Iterator[pa.Table]:
    """One file's rows in tables, its row count then told to the ledger (if any)."""
    yield from _counted(_parquet_file_tables(file_key, file_uri, file_path, fs, source, storage, done, rows_per_block),
                        file_key, ledger)


def _parquet_file_tables(
    file_key: str, file_uri: str, file_path: str, fs: fsspec.AbstractFileSystem, source: SourceConfig,
    storage: StorageConfig, done: frozenset[str], rows_per_block: int,
) -> Iterator[pa.Table]:
    """One file (at ``file_path`` on ``fs``), a row group at a time (the memory bound); damage
    ends it with a '#file' row."""
    columns = [source.key_column, source.image_column]
    try:
        with with_retries(lambda: fs.open(file_path, "rb"), storage, f"open {file_uri}") as handle:
            parquet = with_retries(lambda: pq.ParquetFile(handle), storage, f"read the footer of {file_uri}")
            _check_parquet_schema(parquet.schema_arrow, source, file_uri)
            for index in range(parquet.num_row_groups):
                group = with_retries(
                    lambda: parquet.read_row_group(index, columns=columns), storage, f"read {file_uri}"
                )
                for start in range(0, group.num_rows, rows_per_block):
                    yield _parquet_rows(group.slice(start, rows_per_block), file_uri, source, done)
    except Exception as error:  # corrupt or unreadable: record it (once), keep what was read
        key = f"{file_key[: -len('.parquet')]}/{FILE_ERROR_SUFFIX}"
        if key not in done:
            yield _output_table([key], [file_uri], [None], [_damage("corrupt parquet file", error)])


def _parquet_rows(rows: pa.Table, file_uri: str, source: SourceConfig, done: frozenset[str]) -> pa.Table:
    """Output rows for a slice of a file, the image bytes staying in Arrow buffers.

    A cell over ``source.max_image_bytes`` is an error row (its length is read, not its
    bytes); the row group it came in was read whole, which the writer's row group size bounds.
    """
    keys = pc.cast(rows[source.key_column], pa.string())
    if keys.null_count:
        raise ValueError(f"null value in key column {source.key_column!r}")
    cells = rows[source.image_column]
    sizes = pc.binary_length(cells).to_pylist()
    errors = pa.array([
        "missing image bytes" if size is None
        else _too_large(size, source.max_image_bytes) if size > source.max_image_bytes
        else None
        for size in sizes
    ], pa.string())
    data = pc.if_else(pc.is_null(errors), pc.cast(cells, pa.binary()), pa.scalar(None, pa.binary()))
    key_list = keys.to_pylist()
    uris = pa.array([f"{file_uri}#{key}" for key in key_list], pa.string())
    table = pa.Table.from_arrays([keys, uris, data, errors], schema=OUTPUT_SCHEMA)
    return table.filter(pa.array([key not in done for key in key_list])) if done else table


def _check_parquet_schema(schema: pa.Schema, source: SourceConfig, uri: str) -> None:
    missing = [c for c in (source.key_column, source.image_column) if c not in schema.names]
    if missing:
        raise ValueError(
            f"{uri} has no column {', '.join(map(repr, missing))} (columns: {', '.join(schema.names)}); "
            "set SourceConfig.key_column / image_column"
        )
    image_type = schema.field(source.image_column).type
    if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)):
        raise ValueError(f"{uri}: column {source.image_column!r} is {image_type}, expected binary image bytes")


def _lower(extensions: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(extension.lower() for extension in extensions)


# Taking source URIs apart again (audits) --------------------------------------------------


def tar_shard_key(key: str) -> str:
    """The key of the shard that a tar member's key (or its shard's error row) belongs to:
    the key up to its first segment ending in ".tar" (key scheme 2, module docstring)."""
    segments = key.split("/")
    for end, segment in enumerate(segments[:-1], start=1):
        if segment.lower().endswith(".tar"):
            return "/".join(segments[:end])
    raise ValueError(f"{key!r} is not the key of a tar member")


def split_tar_uri(uri: str, key: str) -> tuple[str, str]:
    """(shard URL, member name) of a tar member's ``source_uri`` "<shard url>#<member>".

    Either URL or name may hold '#' or ".tar#"; the key, which ends with "/<member>" (in
    either key scheme), tells which ".tar#" is the boundary.
    """
    lowered = uri.lower()
    start = lowered.find(".tar#")
    while start != -1:
        member = uri[start + len(".tar#"):]
        if member and key.endswith(f"/{member}"):
            return uri[: start + len(".tar")], member
        start = lowered.find(".tar#", start + 1)
    raise ValueError(f"source_uri {uri!r} does not name a member of a tar shard for key {key!r}")


def split_parquet_uri(uri: str, key: str) -> str:
    """The file URL of a Parquet row's ``source_uri`` "<file url>#<key>"."""
    if not uri.endswith(f"#{key}"):
        raise ValueError(f"source_uri {uri!r} does not name the row of key {key!r} in a Parquet file")
    return uri[: -len(key) - 1]

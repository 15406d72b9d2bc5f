"""Listing an input in Ray tasks: the prefix walked folder by folder, a manifest read as a dataset.

A collection of millions of images must not be listed by one process: one ``find`` of a
prefix on the driver holds every key there (and takes one request after another), and a
manifest read on the driver holds every URI. Here the driver holds folder names and object
references only:

- a prefix is walked breadth first, one delimiter listing (``fs.ls``) per folder; each
  level's folders are listed in parallel tasks, :data:`FOLDERS_PER_TASK` folders per task
  (each task lists its folders concurrently: object stores are latency-bound). A task turns
  what it listed into an Arrow table of :data:`LISTING_SCHEMA` right away and returns it to
  the object store; the driver gets its row count, what it skipped (:class:`Skipped`) and the
  sub-folders to list next. One folder of N objects is listed by one task, which holds its N
  entries while it lists them (an object store cannot split one folder's listing);
- a manifest (``.txt``, ``.csv``, ``.parquet``) is read by Ray Data's readers into blocks,
  and each block is checked and turned into listing rows by a task: rows with an empty key
  or URI, or a relative path, are counted with a few examples and refused on the driver
  (:class:`ManifestError`) before anything is read. Duplicate keys are found where the
  listing meets the archive (:mod:`pipeline.pending`), which partitions the keys anyway.

Keys and URIs are as :mod:`pipeline.sources` defines them (files: the path relative to the
prefix; manifest: the key column, else the URI as written).
"""

from __future__ import annotations

import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray
import ray.data

from pipeline.skipped import SKIPPED_EXAMPLES, Skipped
from pipeline.storage import StorageConfig, filesystem, with_retries

# path: where the listing's filesystem finds the object; null for a manifest's URIs (read as written).
# size, version: the object's size and version (ETag on S3, modification time on a local
# disk) as the listing saw them, null for a manifest's URIs: a shard's marker holds them
# (pipeline.shards), so that a shard changed since it was archived is read again.
LISTING_SCHEMA = pa.schema([("key", pa.string()), ("source_uri", pa.string()), ("path", pa.string()),
                           ("size", pa.int64()), ("version", pa.string())])
FOLDERS_PER_TASK = 64  # folders one listing task takes of a level
_LIST_THREADS = 16  # concurrent delimiter listings per task
MANIFEST_FORMATS = (".txt", ".csv", ".parquet")


@dataclass(frozen=True)
class ImageListing:
    """A listing held in the object store: ``blocks`` (references to Arrow tables of
    :data:`LISTING_SCHEMA`) and each one's row count (``block_rows``: what the anti-join
    sizes its tasks by, without fetching a block), what was ``skipped``, and the
    ``filesystem`` whose paths the rows hold (None for a manifest: each URI names its own)."""

    blocks: list[ray.ObjectRef]
    block_rows: list[int]
    skipped: Skipped
    filesystem: fsspec.AbstractFileSystem | None
    what: str  # "images under s3://..." or "manifest s3://...", for messages

    @property
    def rows(self) -> int:
        return sum(self.block_rows)


class ManifestError(ValueError):
    """A manifest that would make keys ambiguous or reads depend on a worker's directory."""


def few(values: list[str], total: int | None = None, shown: int = 5) -> str:
    """A few values for a message, and how many more there are."""
    total = len(values) if total is None else total
    more = f" and {total - min(shown, len(values))} more" if total > min(shown, len(values)) else ""
    return ", ".join(repr(v) for v in values[:shown]) + more


# A prefix, walked in tasks ------------------------------------------------------------------


def list_prefix(url: str, storage: StorageConfig, suffixes: tuple[str, ...], what: str) -> ImageListing:
    """The objects under ``url`` whose names end with one of ``suffixes`` (lower case;
    matched case-insensitively), listed in tasks; the others are counted as skipped.
    Raises ``FileNotFoundError`` when none is found, saying what was skipped instead."""
    fs, root = filesystem(url, storage)
    level, blocks, block_rows, skipped = [root], [], [], Skipped()
    while level:
        tasks = [_list_folders.options(num_returns=4).remote(fs, level[start:start + FOLDERS_PER_TASK], root, url,
                                                             suffixes, storage)
                 for start in range(0, len(level), FOLDERS_PER_TASK)]
        level = []
        for table, count, folders, task_skipped in tasks:
            count = ray.get(count)
            if count:
                blocks.append(table)
                block_rows.append(count)
            level.extend(ray.get(folders))
            skipped.merge(ray.get(task_skipped))
    if not blocks:
        counted = "".join(f", {count} {extension or 'without extension'}"
                          for extension, count in skipped.counts.most_common(SKIPPED_EXAMPLES))
        raise FileNotFoundError(
            f"no {what} ({', '.join(suffixes)}) under {url}"
            + (f"; skipped {sum(skipped.counts.values())} other files{counted}" if skipped.counts else ""))
    return ImageListing(blocks, block_rows, skipped, fs, f"{what} under {url}")


@ray.remote(num_cpus=0.25, max_retries=3)
def _list_folders(fs: fsspec.AbstractFileSystem, folders: list[str], root: str, url: str, suffixes: tuple[str, ...],
                  storage: StorageConfig) -> tuple[pa.Table, int, list[str], Skipped]:
    """One delimiter listing per folder: the objects taken (a table), how many, the
    sub-folders, and the objects skipped. A folder that does not exist lists as empty (the
    root of an empty input is reported by the driver)."""
    def listed(folder: str) -> list[dict[str, Any]]:
        fs.invalidate_cache(folder)  # a worker that listed before must see what was added since
        try:
            return with_retries(lambda: fs.ls(folder, detail=True), storage, f"list {folder}")
        except FileNotFoundError:
            return []

    with ThreadPoolExecutor(max_workers=max(1, min(_LIST_THREADS, len(folders)))) as pool:
        entries = [entry for found in pool.map(listed, folders) for entry in found]
    taken: list[dict[str, Any]] = []
    subfolders: list[str] = []
    skipped = Skipped()
    for entry in entries:
        path = entry["name"].rstrip("/")
        if entry.get("type") == "directory":
            if path not in folders:  # some stores list a folder as its own entry
                subfolders.append(path)
        elif path.lower().endswith(suffixes):
            taken.append(entry)
        else:
            skipped.add(relative(path, root))
    paths = [entry["name"] for entry in taken]
    table = pa.Table.from_arrays([
        pa.array([relative(path, root) for path in paths], pa.string()),
        pa.array([full_uri(fs, path, url) for path in paths], pa.string()),
        pa.array(paths, pa.string()),
        pa.array([entry.get("size") for entry in taken], pa.int64()),
        pa.array([object_version(entry) for entry in taken], pa.string()),
    ], schema=LISTING_SCHEMA)
    return table, table.num_rows, sorted(subfolders), skipped


def object_version(info: dict[str, Any]) -> str | None:
    """What changes when an object is rewritten, as a listing reports it: the ETag (S3,
    GCS's md5), else the modification time (local disks), else nothing."""
    for field_name in ("ETag", "etag", "md5Hash", "mtime", "LastModified"):
        if info.get(field_name) is not None:
            return f"{field_name}={info[field_name]}"
    return None


def relative(path: str, root: str) -> str:
    """A listed path's key: relative to the prefix, '/'-separated."""
    prefix = root.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else posixpath.basename(path)


def full_uri(fs: fsspec.AbstractFileSystem, path: str, like_url: str) -> str:
    """The path as a URL with the protocol the user gave; a plain local path stays plain."""
    return path if fsspec.core.split_protocol(like_url)[0] is None else fs.unstrip_protocol(path)


# A manifest, read as a dataset --------------------------------------------------------------


def list_manifest(url: str, storage: StorageConfig, uri_column: str, key_column: str) -> ImageListing:
    """The manifest's rows as listing blocks: ``.txt`` one URI per line ('#' comments and
    blank lines left out), CSV and Parquet a ``uri_column`` and, if present, a ``key_column``
    (else the URI is the key). Read by Ray Data (CSV as text: inferred types would turn a
    key "000123" into the number 123), checked per block in tasks."""
    suffix = posixpath.splitext(url.lower())[1]
    if suffix not in MANIFEST_FORMATS:
        raise ValueError(f"manifest {url} must end with one of {', '.join(MANIFEST_FORMATS)}")
    fs, path = filesystem(url, storage)
    if not with_retries(lambda: fs.isfile(path), storage, f"stat {url}"):
        raise FileNotFoundError(f"manifest {url} not found")
    arrow_fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    if suffix == ".txt":
        raw = ray.data.read_text(path, filesystem=arrow_fs)
        uri_column, key_column = "text", "text"
    elif suffix == ".csv":
        import pyarrow.csv as pacsv

        as_text = {uri_column: pa.string(), key_column: pa.string()}
        raw = ray.data.read_csv(path, filesystem=arrow_fs, convert_options=pacsv.ConvertOptions(column_types=as_text))
    else:
        raw = ray.data.read_parquet(path, filesystem=arrow_fs)
    schema = raw.schema()
    if schema is None:  # no rows at all
        raise ManifestError(f"manifest {url} lists no URIs")
    names = schema.names
    if uri_column not in names:
        raise ManifestError(f"manifest {url} has no column {uri_column!r} (columns: {', '.join(names)})")
    key_column = key_column if key_column in names else uri_column
    tasks = [_manifest_rows.options(num_returns=3).remote(block, uri_column, key_column, suffix == ".txt")
             for block in raw.to_arrow_refs()]
    blocks, block_rows, problems = [], [], _Problems()
    for table, count, found in tasks:
        count = ray.get(count)
        if count:
            blocks.append(table)
            block_rows.append(count)
        problems.merge(ray.get(found))
    problems.check(url)
    if not blocks:
        raise ManifestError(f"manifest {url} lists no URIs")
    # every URI listed is read, whatever its name: nothing skipped
    return ImageListing(blocks, block_rows, Skipped(), None, f"manifest {url}")


@dataclass
class _Problems:
    """Rows of a manifest that cannot be read as they are, counted with a few examples."""

    empty: int = 0
    relative: int = 0
    relative_examples: tuple[str, ...] = ()

    def merge(self, other: _Problems) -> None:
        self.empty += other.empty
        self.relative += other.relative
        self.relative_examples = tuple(sorted(set(self.relative_examples) | set(other.relative_examples))[:5])

    def check(self, url: str) -> None:
        if self.empty:
            raise ManifestError(f"manifest {url} has {self.empty} rows with an empty key or URI")
        if self.relative:
            raise ManifestError(f"manifest {url} has relative paths (use URLs or absolute paths): "
                                f"{few(list(self.relative_examples), self.relative)}")


@ray.remote(num_cpus=0.25)
def _manifest_rows(block: pa.Table, uri_column: str, key_column: str, text: bool) -> tuple[pa.Table, int, _Problems]:
    """One block of a manifest as listing rows, and what is wrong with its rows."""
    uris = pc.utf8_trim_whitespace(pc.cast(block[uri_column], pa.string())) if text \
        else pc.cast(block[uri_column], pa.string())
    keys = uris if key_column == uri_column else pc.cast(block[key_column], pa.string())
    if text:  # blank lines and '#' comments are not rows
        keep = pc.and_(pc.not_equal(uris, ""), pc.invert(pc.starts_with(uris, "#")))
        uris, keys = uris.filter(keep), keys.filter(keep)
    problems = _Problems()
    empty = pc.or_(pc.or_(pc.is_null(uris), pc.equal(uris, "")), pc.or_(pc.is_null(keys), pc.equal(keys, "")))
    problems.empty = int(pc.sum(pc.fill_null(empty, True)).as_py() or 0)
    # Whole columns first: a URI with a protocol before "://" (fsspec's rule: two characters
    # at least) or an absolute path is fine; only the few others are asked one by one (a
    # Python string per row of a million-row block cost more memory than the block).
    plain = pc.and_(pc.invert(pc.starts_with(uris, "/")), pc.less(pc.find_substring(uris, "://"), 2))
    relative_uris = [uri for uri in uris.filter(pc.fill_null(plain, False)).to_pylist()
                     if uri and fsspec.core.split_protocol(uri)[0] is None and not posixpath.isabs(uri)]
    problems.relative, problems.relative_examples = len(relative_uris), tuple(sorted(relative_uris)[:5])
    nulls = pa.nulls(len(uris))
    table = pa.Table.from_arrays([keys, uris, nulls.cast(pa.string()), nulls.cast(pa.int64()),
                                  nulls.cast(pa.string())], schema=LISTING_SCHEMA)
    return table, table.num_rows, problems

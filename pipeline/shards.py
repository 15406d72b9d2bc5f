"""Shard completion markers: a rerun over tar or Parquet shards skips the finished ones unread.

A collection in shards (WebDataset tar files, Parquet files of images) is resumed shard by
shard, as img2dataset does with its per-shard stats files. When every row of a shard is in
the archive, and none of them failed for a passing reason (a retryable error row,
pipeline.errors), the run writes a marker ``ARCHIVE/_shards/<shard id>.<version id>.json``:

- the shard id is a hash of the shard's key (its path under the input prefix), so that a
  marker names one shard whatever characters its path has;
- the version id is a hash of the shard's size and its version as the listing reports it
  (the object's ETag on S3, its modification time on a local disk): a shard rewritten
  since it was archived has a marker that no longer matches, and is read again, by key;
- the body (JSON: shard key and URI, size, version, rows, job, time) is for people: a
  rerun decides from the marker names alone, one listing of ``_shards/``, never reading one.

A rerun then reads only the shards without a matching marker (those a killed run left
partly done, new ones, changed ones), each with the keys it already has in the archive
(:func:`with_done_keys`), so the driver holds the keys of the unfinished shards, not of the
archive, each read task only its own shard's, and a finished shard costs one name in a listing.

How a run knows that a shard is finished: the task that reads a shard reports how many
rows it emitted once it reaches the shard's end (:meth:`ShardLedger.emitted`), and each
write task reports, per shard, how many rows the file it committed holds and how many of
them are retryable (:meth:`ShardLedger.written`). Rows flow through decoding and encoding
in any order and in any files, so the two reports come in any order too; the ledger (one
small actor per run, holding a few counters per shard in flight) writes the marker when a
shard's rows are all written, none retryable. Reports are idempotent: a retried read task
reports its shard's count again, a retried write task its file (named by its keys:
pipeline.archive) again, and neither is counted twice.

The markers are written only by the compress job, under its lease (pipeline.lease). An
archive whose data files were removed by hand must lose its ``_shards/`` too, or the next
run would trust markers for rows that are gone; ``--verify-all`` counts rows, not markers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.archive import done_keys_by
from pipeline.errors import is_retryable
from pipeline.sources import FILE_ERROR_SUFFIX, Listing, split_parquet_uri, tar_shard_key
from pipeline.storage import StorageConfig, filesystem, with_retries

if TYPE_CHECKING:
    from ray.actor import ActorHandle

MARKERS_DIR = "_shards"
_ID_HEX = 32  # 128 bits of SHA-256: no two shards of any collection share an id


def shard_id(shard_key: str) -> str:
    return hashlib.sha256(shard_key.encode()).hexdigest()[:_ID_HEX]


def version_id(size: int | None, version: str | None) -> str:
    return hashlib.sha256(json.dumps([size, version]).encode()).hexdigest()[:16]


def marker_name(shard_key: str, size: int | None, version: str | None) -> str:
    return f"{shard_id(shard_key)}.{version_id(size, version)}.json"


def finished_shards(url: str, storage: StorageConfig, listing: pa.Table) -> set[str]:
    """Keys of the listed shards (``listing``: key, size, version) whose marker matches
    their current size and version: finished by an earlier run, unchanged since."""
    fs, root = filesystem(url, storage)
    folder = posixpath.join(root, MARKERS_DIR)
    fs.invalidate_cache(folder)
    if not fs.exists(folder):
        return set()
    names = {posixpath.basename(path) for path in with_retries(lambda: fs.ls(folder, detail=False), storage,
                                                                f"list {folder}")}
    return {key for key, size, version in zip(listing["key"].to_pylist(), listing["size"].to_pylist(),
                                              listing["version"].to_pylist())
            if marker_name(key, size, version) in names}


def shard_ref(kind: str, key: str, source_uri: str) -> str:
    """What names the shard of an archived row: for tar members the shard's key (a key is
    "<shard key>/<member>", the shard key ending at its first segment ending in ".tar":
    pipeline.sources), for Parquet rows the file's URI (a Parquet key is the input's own,
    and the source URI is "<file uri>#<key>"). Error rows of a whole shard or file
    ("<...>/#shard", "<...>/#file") carry the shard's or the file's URI."""
    if kind == "tar":
        return tar_shard_key(key)
    if key.endswith(f"/{FILE_ERROR_SUFFIX}"):
        return source_uri
    return split_parquet_uri(source_uri, key)


@dataclass(frozen=True)
class ShardResume:
    """Where a run over a sharded source starts: the shards to read (``listing.items``, each
    with its own archived keys in a ``done`` column: :func:`with_done_keys`), how many keys
    that is in all, how many shards were finished before (skipped unread), and the ledger
    that marks the shards this run finishes."""

    kind: str
    listing: Listing
    done_keys: int
    finished_before: int
    ledger: ActorHandle

    def progress(self) -> ShardProgress:
        """The archive writer's report to the ledger (pipeline.archive.ArchiveDatasink)."""
        return ShardProgress(self.ledger, self.kind)


def resume_shards(url: str, storage: StorageConfig, kind: str, listing: Listing, job_id: str) -> ShardResume:
    """Plan a run over tar or Parquet shards: the finished ones (markers) are left out of
    the listing, and only the keys of the others are read from the archive, grouped by
    shard, so that each shard's reader gets its own keys and nothing more."""
    items = listing.items
    finished = finished_shards(url, storage, items)
    if finished:
        items = items.filter(pc.invert(pc.is_in(items["key"], value_set=pa.array(sorted(finished), pa.string()))))
    ref_column = "key" if kind == "tar" else "source_uri"
    refs = set(items[ref_column].to_pylist())

    def todo_shard(key: str, source_uri: str) -> str | None:
        try:
            ref = shard_ref(kind, key, source_uri)
        except ValueError:  # not a row of this kind of source: not one of these shards
            return None
        return ref if ref in refs else None

    done = done_keys_by(url, storage, todo_shard) if items.num_rows else {}
    ledger = ShardLedger.remote(url, storage, kind, job_id, items)
    return ShardResume(kind, dataclasses.replace(listing, items=with_done_keys(items, ref_column, done)),
                       sum(len(keys) for keys in done.values()), len(finished), ledger)


def with_done_keys(items: pa.Table, ref_column: str, done: dict[str, set[str]]) -> pa.Table:
    """``items`` (a shard listing) with a ``done`` column: the sorted keys each shard
    (named by ``ref_column``) already has in the archive, which its reader skips
    (pipeline.sources.read_shards)."""
    column = pa.array([sorted(done.get(ref, ())) for ref in items[ref_column].to_pylist()], pa.list_(pa.string()))
    return items.append_column("done", column)


@dataclass
class _Shard:
    key: str
    uri: str
    size: int | None
    version: str | None
    emitted: int | None = None  # rows the read task emitted; None until it reached the shard's end
    files: dict[str, tuple[int, int]] = field(default_factory=dict)  # file name -> (rows, retryable rows)
    finished: bool = False


@ray.remote(num_cpus=0)
class ShardLedger:
    """The shards of one run in flight, and their markers (module docstring)."""

    def __init__(self, url: str, storage: StorageConfig, kind: str, job_id: str, shards: pa.Table) -> None:
        self.url, self.storage, self.job_id = url, storage, job_id
        self.shards = {key: _Shard(key, uri, size, version) for key, uri, size, version in zip(
            shards["key"].to_pylist(), shards["source_uri"].to_pylist(), shards["size"].to_pylist(),
            shards["version"].to_pylist())}
        # A row names its shard by key (tar) or by URI (Parquet): shard_ref.
        self.by_ref = {(s.key if kind == "tar" else s.uri): s for s in self.shards.values()}

    def emitted(self, shard_key: str, rows: int) -> None:
        """The read task of ``shard_key`` reached its end, having emitted ``rows`` rows."""
        shard = self.shards[shard_key]
        shard.emitted = rows
        self._check(shard)

    def written(self, file_name: str, counts: dict[str, tuple[int, int]]) -> None:
        """A write task committed ``file_name``: (rows, retryable rows) per shard ref."""
        for ref, rows in counts.items():
            shard = self.by_ref[ref]
            shard.files[file_name] = rows
            self._check(shard)

    def finished(self) -> int:
        return sum(s.finished for s in self.shards.values())

    def _check(self, shard: _Shard) -> None:
        if shard.emitted is None or shard.finished:
            return
        rows = sum(rows for rows, _ in shard.files.values())
        if rows == shard.emitted and not any(retryable for _, retryable in shard.files.values()):
            self._write_marker(shard, rows)
            shard.finished, shard.files = True, {}

    def _write_marker(self, shard: _Shard, rows: int) -> None:
        fs, root = filesystem(self.url, self.storage)
        folder = posixpath.join(root, MARKERS_DIR)
        path = posixpath.join(folder, marker_name(shard.key, shard.size, shard.version))
        body = json.dumps({"shard": shard.key, "uri": shard.uri, "size": shard.size, "version": shard.version,
                           "rows": rows, "job_id": self.job_id,
                           "completed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}, indent=1)
        with_retries(lambda: fs.makedirs(folder, exist_ok=True), self.storage, f"create {folder}")
        with_retries(lambda: fs.pipe_file(path, body.encode()), self.storage, f"write {path}")


@dataclass(frozen=True)
class ShardProgress:
    """Called by each write task with the file it committed: tells the ledger how many of
    its rows, and how many retryable ones, each shard has."""

    ledger: ActorHandle
    kind: str

    def __call__(self, file_name: str, table: pa.Table) -> None:
        counts: Counter[str] = Counter()
        retryable: Counter[str] = Counter()
        for key, uri, error in zip(table["key"].to_pylist(), table["source_uri"].to_pylist(),
                                   table["error"].to_pylist()):
            ref = shard_ref(self.kind, key, uri)
            counts[ref] += 1
            retryable[ref] += is_retryable(error)
        ray.get(self.ledger.written.remote(file_name, {ref: (counts[ref], retryable[ref]) for ref in counts}))

"""What a run over files or a manifest still has to read: the listing less the archived keys,
by a hash-partitioned anti-join in tasks, so that no process holds the keys of the archive.

A rerun must skip every key the archive already holds (resume after a crash or a kill),
and a manifest must not name one key twice. Both are questions about all keys at once;
asked on the driver they cost memory linear in the collection (about 2 GB at 10 M keys,
issue 23). Here they are answered the way a distributed join answers them:

1. the listing blocks, and the archive's data files (their ``key`` and ``error`` columns
   only), are split by tasks into ``partitions`` parts by a hash of the key (CRC-32: the
   same in every process, unlike Python's ``hash``). A split task takes a share of at most
   :data:`SHARE_ROWS` listed rows or :data:`SHARE_FILES` data files, so its memory does not
   grow with the collection. A key whose only rows are retryable errors (pipeline.errors)
   counts as not archived: the rerun tries it again;
2. one task per partition takes that partition's parts from both sides: keys listed
   twice are duplicates (counted, a few named), listed keys with an archived row are left
   out, and the rest is yielded in blocks of :data:`BLOCK_ROWS` rows, ready to be fetched.

The driver holds object references and counts; a task holds one share or one partition,
about :data:`PARTITION_ROWS` listed keys and the archive's keys that hash with them. Data
files whose keys were formed by another key scheme are refused (``ValueError``,
:func:`pipeline.archive.check_key_scheme`): a rerun would archive their images again under
new keys.

Ray keeps a task's returns under 100 KB in the memory of the process that called it (here
the driver), and there are (shares a side) x (partitions) parts: they must stay large.
With shares of fixed size both counts grow with the collection, so a part holds about
``SHARE_ROWS / partitions`` keys: about 25,000 at 10 M keys, 2,500 (100 KB or so) at 100 M.
Beyond that the parts would have to be gathered in fewer, larger objects.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.archive import check_key_scheme, list_data_files, read_data_file
from pipeline.errors import is_retryable
from pipeline.listing import ImageListing, few
from pipeline.skipped import Skipped
from pipeline.storage import StorageConfig, filesystem

PARTITION_ROWS = 1_000_000  # listed keys per partition: a join task's memory is about this many keys of each side
MAX_PARTITIONS = 4096
# A split task's share, fixed so that its memory is: split tasks once took 1/32 of a side
# each, whatever its size (at 10 M keys a million listed rows a task).
SHARE_ROWS = 250_000  # listed rows (whole listing blocks; a larger block is a share alone)
SHARE_FILES = 32  # archive data files (the writer bounds their rows: ResourcePlan.rows_per_file)
READ_THREADS = 8  # data files a split task reads at once (object stores answer slowly, in parallel)
BLOCK_ROWS = 1024  # listing rows per block to fetch: a fetch task's share, and what a retry redoes


@dataclass(frozen=True)
class PendingImages:
    """The listed images not yet archived, as blocks of listing rows in the object store."""

    blocks: list[ray.ObjectRef]
    rows: int
    archived: int  # listed keys left out because the archive holds them
    skipped: Skipped
    filesystem: fsspec.AbstractFileSystem | None


class DuplicateKeysError(ValueError):
    """A listing that names one key twice: the archive could not tell the images apart."""


def pending_images(listing: ImageListing, archive: str, storage: StorageConfig) -> PendingImages:
    """The rows of ``listing`` whose keys ``archive`` does not hold yet (module docstring);
    refused (:class:`DuplicateKeysError`) if the listing names a key twice."""
    partitions = min(MAX_PARTITIONS, max(1, math.ceil(listing.rows / PARTITION_ROWS)))
    fs, _ = filesystem(archive, storage)
    files = list_data_files(archive, storage)
    listed = [_split.options(num_returns=partitions + 1).remote(partitions, *listing.blocks[share])[:partitions]
              for share in _shares(listing.block_rows, SHARE_ROWS)]
    archived_parts = [_split_archived.options(num_returns=partitions + 1).remote(fs, files[share], partitions)
                      for share in _shares([1] * len(files), SHARE_FILES)]
    for problem in ray.get([parts[partitions] for parts in archived_parts]):
        if problem:
            raise ValueError(problem)
    joins = [_join.remote(p, len(listed), *[parts[p] for parts in listed], *[parts[p] for parts in archived_parts])
             for p in range(partitions)]
    blocks, rows, archived, duplicates, examples = [], 0, 0, 0, []
    for join in joins:
        outputs = list(join)
        stats = ray.get(outputs.pop())
        blocks.extend(outputs)
        rows += stats["rows"]
        archived += stats["archived"]
        duplicates += stats["duplicates"]
        examples.extend(stats["examples"])
    if duplicates:
        raise DuplicateKeysError(f"{listing.what} has {duplicates} duplicate keys (keys must be unique): "
                                 f"{few(sorted(examples), duplicates)}")
    return PendingImages(blocks, rows, archived, listing.skipped, listing.filesystem)


def partition_of(keys: pa.ChunkedArray | pa.Array, partitions: int) -> np.ndarray:
    """Each key's partition: CRC-32 of its UTF-8 bytes, modulo ``partitions``."""
    return np.fromiter((zlib.crc32(key.encode()) % partitions for key in keys.to_pylist()), dtype=np.int64,
                       count=len(keys))


def _parts(table: pa.Table, partitions: int) -> list[pa.Table]:
    """``table`` split by the partition of its keys, each part's rows in their order."""
    which = partition_of(table["key"], partitions)
    order = np.argsort(which, kind="stable")
    ordered = table.take(pa.array(order))
    bounds = np.concatenate([[0], np.cumsum(np.bincount(which, minlength=partitions))])
    return [ordered.slice(bounds[p], bounds[p + 1] - bounds[p]) for p in range(partitions)]


def _shares(sizes: list[int], limit: int) -> list[slice]:
    """Contiguous runs of items whose ``sizes`` add up to at most ``limit`` (an item larger
    than that is a run alone), none empty."""
    shares, start, total = [], 0, 0
    for index, size in enumerate(sizes):
        if total and total + size > limit:
            shares.append(slice(start, index))
            start, total = index, 0
        total += size
    if start < len(sizes):
        shares.append(slice(start, len(sizes)))
    return shares


@ray.remote(num_cpus=0.25)
def _split(partitions: int, *blocks: pa.Table) -> tuple[pa.Table | None, ...]:
    """Listing blocks' rows in parts (one extra return: Ray wants two at least)."""
    return (*_parts(pa.concat_tables(blocks), partitions), None)


@ray.remote(num_cpus=0.25, max_retries=3)
def _split_archived(fs: fsspec.AbstractFileSystem, paths: list[str],
                    partitions: int) -> tuple[pa.Table | str | None, ...]:
    """Archive data files' done keys (every key with a row that is not a retryable error),
    in parts; the last return is why a file cannot be resumed over, or None."""
    with ThreadPoolExecutor(READ_THREADS) as pool:
        tables = list(pool.map(lambda path: read_data_file(path, fs, ["key", "error"]), paths))
    done = []
    for path, table in zip(paths, tables):
        try:
            check_key_scheme(table.schema.metadata or {}, fs.unstrip_protocol(path))
        except ValueError as error:
            return (*[None] * partitions, str(error))
        errors = table["error"]
        if errors.null_count < len(errors):  # rows with an error: only retryable ones leave their key to do again
            keep = pa.array([not is_retryable(error) for error in errors.to_pylist()], pa.bool_())
            table = table.filter(keep)
        done.append(table.select(["key"]))
    return (*_parts(pa.concat_tables(done, promote_options="permissive"), partitions), None)


@ray.remote(num_cpus=0.25, num_returns="streaming")
def _join(partition: int, listed_parts: int, *parts: pa.Table) -> Iterator[pa.Table | dict[str, Any]]:
    """One partition: its listed rows not archived, in blocks, then (last) its counts."""
    listed = pa.concat_tables(parts[:listed_parts]) if listed_parts else None
    archived_keys = pa.concat_arrays([part["key"].combine_chunks() for part in parts[listed_parts:]]) \
        if len(parts) > listed_parts else pa.array([], pa.string())
    stats = {"partition": partition, "rows": 0, "archived": 0, "duplicates": 0, "examples": []}
    if listed is not None and listed.num_rows:
        counts = pc.value_counts(listed["key"])
        repeated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
        stats["duplicates"], stats["examples"] = len(repeated), sorted(repeated.to_pylist())[:5]
        todo = listed.filter(pc.invert(pc.is_in(listed["key"], value_set=archived_keys)))
        stats["rows"], stats["archived"] = todo.num_rows, listed.num_rows - todo.num_rows
        for start in range(0, todo.num_rows, BLOCK_ROWS):
            yield todo.slice(start, BLOCK_ROWS)
    yield stats

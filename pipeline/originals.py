"""Reading archived images' originals again, where the compress job read them (audits).

A row's ``source_uri`` (pipeline/sources.py) names a whole object, a tar member
("<shard url>#<member>") or a Parquet row ("<file url>#<key>"); which of them, and for
Parquet the key and image columns, is what the compress job was given: the data file's
``corrdiff.config`` metadata (pipeline/archive.py), read once per data file. The URI alone
could not say it: '#' is as legal in a file name as in a member name.

- A listed object (files, tar shards, Parquet files) is read at the URL the listing wrote,
  taken literally (storage.literal_filesystem): '::' is part of its name, not a chain. A
  manifest's URI is resolved as the fsspec URL its author wrote, as the compress job did.
- Tar members of one shard are read in one pass over the shard, seeking from header to
  header past the data of members not asked for, and stopping once all are found.
- Parquet cells are found by the key column, one row group at a time; the image column is
  read only for row groups that hold a wanted key.
- Every image is at most ``max_bytes`` (as at compression: the object's size, the member's
  header, the cell's length are checked before the bytes are kept).

Failures are values, not raises: each original is its bytes or the exception that stopped
it (FileNotFoundError when it is not there), for the audit to classify.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.archive import file_metadata
from pipeline.sources import ImageTooLarge, SourceConfig, read_capped, split_parquet_uri, split_tar_uri
from pipeline.storage import StorageConfig, filesystem, literal_filesystem, with_retries

Original = bytes | Exception  # the bytes, or why there are none


def read_originals(rows: list[dict[str, Any]], storage: StorageConfig, max_bytes: int) -> list[Original]:
    """The original of each row (``key``, ``source_uri``, ``archive_file``), in order."""
    sources = {path: _archived_source(path, storage) for path in {row["archive_file"] for row in rows}}
    originals: dict[int, Original] = {}
    # (kind, container URL[, key column, image column]) -> (row index, member name or key)
    groups: dict[tuple[str, ...], list[tuple[int, str]]] = {}
    for index, row in enumerate(rows):
        source = sources[row["archive_file"]]
        try:
            if isinstance(source, Exception):
                raise source
            if source.kind == "tar":
                shard, member = split_tar_uri(row["source_uri"], row["key"])
                groups.setdefault(("tar", shard), []).append((index, member))
            elif source.kind == "parquet":
                file = split_parquet_uri(row["source_uri"], row["key"])
                groups.setdefault(("parquet", file, source.key_column, source.image_column), []).append(
                    (index, row["key"]))
            else:
                originals[index] = _read_object(row["source_uri"], source.kind, storage, max_bytes)
        except Exception as error:  # noqa: BLE001 - one row's finding, the others go on
            originals[index] = error
    for group, members in groups.items():
        names = {name for _, name in members}
        if group[0] == "tar":
            found = _read_tar_members(group[1], names, storage, max_bytes)
        else:
            found = _read_parquet_cells(group[1], names, group[2], group[3], storage, max_bytes)
        originals |= {index: found[name] for index, name in members}
    return [originals[index] for index in range(len(rows))]


def _archived_source(archive_file: str, storage: StorageConfig) -> SourceConfig | Exception:
    """The input of the job that wrote a data file, from its metadata; a file without it
    (not written by this project) is taken as a folder of files."""
    try:
        metadata = with_retries(lambda: file_metadata(archive_file, storage), storage, f"read {archive_file}")
        given = json.loads(metadata.get("corrdiff.config", "{}")).get("input") or {}
        return SourceConfig(url=str(given.get("url", "")), **{
            name: given[name] for name in ("kind", "key_column", "image_column") if name in given})
    except Exception as error:  # noqa: BLE001 - then none of its rows' originals can be read
        return error


def _read_object(uri: str, kind: str, storage: StorageConfig, max_bytes: int) -> Original:
    try:
        fs, path = filesystem(uri, storage) if kind == "manifest" else literal_filesystem(uri, storage)
        return read_capped(fs, path, uri, storage, max_bytes)
    except Exception as error:  # noqa: BLE001 - a finding of this row
        return error


def _read_tar_members(shard_url: str, names: set[str], storage: StorageConfig, max_bytes: int) -> dict[str, Original]:
    """The members ``names`` of one shard (the first of a repeated name, as archived)."""
    fs, path = literal_filesystem(shard_url, storage)
    found: dict[str, Original] = {}

    def scan() -> None:
        with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as archive:
            for member in archive:  # headers only: tarfile seeks past the data of the others
                if member.name in names and member.name not in found and member.isfile():
                    found[member.name] = ImageTooLarge(member.size, max_bytes) if member.size > max_bytes \
                        else archive.extractfile(member).read()
                    if len(found) == len(names):
                        return

    return _each(names, found, lambda: with_retries(scan, storage, f"read {shard_url}"),
                 lambda name: FileNotFoundError(f"no member {name!r} in {shard_url}"))


def _read_parquet_cells(file_url: str, keys: set[str], key_column: str, image_column: str, storage: StorageConfig,
                        max_bytes: int) -> dict[str, Original]:
    """The image cells of the rows with ``keys`` (keys compared as text, as archived)."""
    fs, path = literal_filesystem(file_url, storage)
    found: dict[str, Original] = {}

    def scan() -> None:
        with fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            for group in range(parquet.num_row_groups):
                group_keys = pc.cast(parquet.read_row_group(group, columns=[key_column])[key_column],
                                     pa.string()).to_pylist()
                positions: dict[str, int] = {}
                for position, key in enumerate(group_keys):
                    if key in keys and key not in found:
                        positions.setdefault(key, position)
                if not positions:
                    continue
                cells = parquet.read_row_group(group, columns=[image_column])[image_column]
                cells = cells.take(pa.array(list(positions.values()), pa.int64()))
                for key, size, cell in zip(positions, pc.binary_length(cells).to_pylist(), cells):
                    found[key] = FileNotFoundError(f"no image bytes for key {key!r} in {file_url}") if size is None \
                        else ImageTooLarge(size, max_bytes) if size > max_bytes else cell.as_py()
                if len(found) == len(keys):
                    return

    return _each(keys, found, lambda: with_retries(scan, storage, f"read {file_url}"),
                 lambda key: FileNotFoundError(f"no row with key {key!r} in {file_url}"))


def _each(wanted: set[str], found: dict[str, Original], scan: Callable[[], None],
          absent: Callable[[str], Exception]) -> dict[str, Original]:
    """Every wanted name's original after ``scan`` has filled ``found``: what it found before
    it failed is kept (the members before a shard's damage were archived too); the rest get
    its error, or, when it finished, ``absent(name)``."""
    try:
        scan()
    except Exception as error:  # noqa: BLE001 - the container is unreadable from here on
        return {name: found.get(name, error) for name in wanted}
    return {name: found[name] if name in found else absent(name) for name in wanted}

"""Retrying what failed for a passing reason, with one row per key at the end.

A rerun processes again the keys whose only rows are retryable errors (pipeline.errors):
``done_keys`` leaves them out. Its new row is then the key's second row, so, still under
the archive's lease, :func:`supersede_retried` rewrites every data file holding a
retryable error row of a key that has a newer row, without that row. Only retryable error
rows are ever dropped: a record, or a final error, is never removed by this.

A rewrite must survive a kill at any point without losing or doubling a row. Each one is
journaled first (``_rewrites/<id>.json``: the old file, and the new one or none), then the
new file is written (hidden name, then renamed), then the old one deleted, then the
journal. :func:`finish_rewrites`, run by the next compress run before anything else,
completes a journaled rewrite whose new file exists (deletes the old one) and forgets one
whose new file never appeared (the old one is still whole). Between the rename and the
delete a reader can see both files: an audit in that moment may count a key twice.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from collections import defaultdict
from dataclasses import dataclass
from functools import partial

import pyarrow as pa
import pyarrow.compute as pc
from fsspec import AbstractFileSystem

from pipeline.archive import data_file_name, footer_summary, per_data_file, read_data_file, write_data_file
from pipeline.errors import is_retryable
from pipeline.storage import StorageConfig, filesystem

REWRITES_DIR = "_rewrites"
MAX_JOURNAL_BYTES = 64 * 1024  # a journal entry is a few hundred bytes; anything more is not ours


@dataclass(frozen=True)
class Superseded:
    rows: int  # retryable error rows removed
    files: int  # data files rewritten (or deleted, when nothing else was in them)


def supersede_retried(url: str, storage: StorageConfig) -> Superseded:
    """Drop the retryable error rows of keys that have a newer row (see the module).

    What the driver holds is bounded by the retryable rows, never by the archive: the files
    whose footer summary counts a retryable error row give the retried keys; then each data
    file's key column (read in parallel, a batch of files at a time) gives, for those keys
    alone, their newest row's time. When no footer counts a retryable row, there is nothing
    to drop and no row is read: the usual end of a run."""
    with_retryable = [path for path, _, summary in per_data_file(url, storage, partial(footer_summary, storage=storage))
                      if summary.retryable_errors]
    if not with_retryable:
        return Superseded(rows=0, files=0)
    fs, root = filesystem(url, storage)
    retried: dict[str, list[tuple[str, int, object]]] = defaultdict(list)
    for path in with_retryable:
        table = read_data_file(path, fs, ["key", "error", "created_at"])
        for row, (key, error, created) in enumerate(zip(*(table[c].to_pylist() for c in table.column_names))):
            if is_retryable(error):
                retried[key].append((path, row, created))
    newest = _newest_rows(url, storage, pa.array(sorted(retried), pa.string()))
    drop: dict[str, set[int]] = defaultdict(set)
    for key, rows in retried.items():
        for path, row, created in rows:
            if created < newest[key]:
                drop[path].add(row)
    for path, rows in sorted(drop.items()):
        _rewrite_without(fs, root, path, rows, storage)
    return Superseded(rows=sum(len(rows) for rows in drop.values()), files=len(drop))


def _newest_rows(url: str, storage: StorageConfig, keys: pa.Array) -> dict[str, object]:
    """The time of each of ``keys``' newest row, over every data file."""
    def rows_of_keys(path: str, fs: AbstractFileSystem) -> pa.Table:
        table = read_data_file(path, fs, ["key", "created_at"])
        return table.filter(pc.is_in(table["key"], value_set=keys))

    newest: dict[str, object] = {}
    for _, _, table in per_data_file(url, storage, rows_of_keys):
        for key, created in zip(table["key"].to_pylist(), table["created_at"].to_pylist()):
            if key not in newest or created > newest[key]:
                newest[key] = created
    return newest


def finish_rewrites(url: str, storage: StorageConfig) -> int:
    """Complete or forget the rewrites a killed run left journaled; how many there were."""
    fs, root = filesystem(url, storage)
    journal_dir = posixpath.join(root, REWRITES_DIR)
    if not fs.exists(journal_dir):
        return 0
    entries = sorted(p for p in fs.ls(journal_dir, detail=False) if p.endswith(".json"))
    for entry in entries:
        with fs.open(entry, "rb") as handle:
            plan = json.loads(handle.read(MAX_JOURNAL_BYTES))
        old, new = _inside(root, plan.get("old")), _inside(root, plan.get("new"))
        # Delete the old file only if the plan was to drop it whole, or its successor is in place.
        if old and fs.exists(old) and (plan.get("new") is None or (new and fs.exists(new))):
            fs.rm(old)
        fs.rm(entry)
    return len(entries)


def _rewrite_without(fs: AbstractFileSystem, root: str, path: str, rows: set[int], storage: StorageConfig) -> None:
    table = read_data_file(path, fs, None)
    remaining = table.filter(pa.array([i not in rows for i in range(table.num_rows)]))
    job = (table.schema.metadata or {}).get(b"corrdiff.job_id", b"unknown").decode()
    entry = posixpath.join(root, REWRITES_DIR, f"{uuid.uuid4().hex}.json")
    fs.makedirs(posixpath.dirname(entry), exist_ok=True)
    new = posixpath.join(root, data_file_name(job, remaining)) if remaining.num_rows else None
    fs.pipe_file(entry, json.dumps({"old": path, "new": new}).encode())
    if new is not None:
        write_data_file(fs, root, job, remaining, storage)
    fs.rm(path)
    fs.rm(entry)


def _inside(root: str, path: object) -> str | None:
    """A journaled path, only if it names a data file directly inside the archive (a
    journal is read back from storage: it must not be able to delete anything else)."""
    if not isinstance(path, str) or posixpath.dirname(path) != root.rstrip("/"):
        return None
    name = posixpath.basename(path)
    return path if name.startswith("part-") and name.endswith(".parquet") else None


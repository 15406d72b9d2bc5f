"""Retryable error rows replaced by a rerun's rows, crash-safely (pipeline.supersede); no Ray."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.archive import SCHEMA, data_file_bytes, done_keys, list_data_files, read_columns
from pipeline.errors import is_retryable, retryable
from pipeline.storage import StorageConfig
from pipeline.supersede import REWRITES_DIR, Superseded, finish_rewrites, supersede_retried

EARLY = datetime(2026, 1, 1, tzinfo=timezone.utc)
STORAGE = StorageConfig()


def _file(archive: Path, name: str, rows: list[tuple[str, str | None, datetime]], job: str = "job") -> Path:
    """A data file of rows (key, error, created_at); a None error stands for a record."""
    table = pa.Table.from_pylist([{"key": key, "source_uri": f"/in/{key}", "error": error, "created_at": created,
                                   "job_id": job, "record": None if error else b"record"}
                                  for key, error, created in rows], schema=SCHEMA)
    archive.mkdir(exist_ok=True)
    path = archive / name
    path.write_bytes(data_file_bytes(table.replace_schema_metadata({"corrdiff.job_id": job})))
    return path


def _rows(archive: Path) -> list[tuple[str, str | None]]:
    table = read_columns(str(archive), STORAGE, ["key", "error"])
    return sorted(zip(table["key"].to_pylist(), table["error"].to_pylist()), key=lambda r: (r[0], r[1] or ""))


def test_the_error_text_says_whether_a_rerun_retries_it():
    assert is_retryable(retryable("read failed", "ConnectionError: reset by peer"))
    assert not is_retryable("corrupt or truncated image: image file is truncated (retryable)")
    assert not is_retryable(None)


def test_a_rerun_retries_retryable_rows_and_then_they_are_gone(tmp_path):
    archive = tmp_path / "archive"
    lost = retryable("read failed", "ConnectionError")
    _file(archive, "part-first-a.parquet", [("a", None, EARLY), ("b", lost, EARLY), ("c", "not an image", EARLY)],
          job="first")
    assert done_keys(str(archive), STORAGE) == {"a", "c"}  # b is tried again, c is final
    _file(archive, "part-second-b.parquet", [("b", None, EARLY + timedelta(hours=1))], job="second")

    superseded = supersede_retried(str(archive), STORAGE)

    assert (superseded.rows, superseded.files) == (1, 1)
    assert _rows(archive) == [("a", None), ("b", None), ("c", "not an image")]
    assert not (archive / "part-first-a.parquet").exists()  # rewritten under its new keys' name
    assert done_keys(str(archive), STORAGE) == {"a", "b", "c"}


def test_only_older_retryable_rows_are_ever_dropped(tmp_path):
    """A record twice, or a retry that failed again: the newest row stays, no record is lost."""
    archive = tmp_path / "archive"
    lost = retryable("worker died", "killed by SIGKILL")
    _file(archive, "part-1-x.parquet", [("a", None, EARLY), ("b", lost, EARLY + timedelta(hours=2))])
    _file(archive, "part-2-y.parquet", [("a", None, EARLY + timedelta(hours=1)), ("b", lost, EARLY)])
    assert supersede_retried(str(archive), STORAGE).rows == 1  # b's older failure
    assert _rows(archive) == [("a", None), ("a", None), ("b", lost)]


def test_a_file_of_nothing_but_replaced_rows_is_deleted(tmp_path):
    archive = tmp_path / "archive"
    _file(archive, "part-1-x.parquet", [("b", retryable("encode failed", "OutOfMemoryError"), EARLY)])
    _file(archive, "part-2-y.parquet", [("b", None, EARLY + timedelta(hours=1))])
    supersede_retried(str(archive), STORAGE)
    assert [Path(p).name for p in list_data_files(str(archive), STORAGE)] == ["part-2-y.parquet"]


def test_a_rewrite_killed_halfway_is_finished_or_forgotten_by_the_next_run(tmp_path):
    archive = tmp_path / "archive"
    old = _file(archive, "part-1-old.parquet", [("a", None, EARLY), ("b", retryable("x", "y"), EARLY)])
    new = _file(archive, "part-1-new.parquet", [("a", None, EARLY)])
    journal = archive / REWRITES_DIR
    journal.mkdir()
    # Killed after the new file's rename: the old one goes.
    (journal / "1.json").write_text(json.dumps({"old": str(old), "new": str(new)}))
    # Killed before a new file appeared: the old one stays whole.
    kept = _file(archive, "part-1-kept.parquet", [("c", None, EARLY)])
    (journal / "2.json").write_text(json.dumps({"old": str(kept), "new": str(archive / "part-1-never.parquet")}))
    # A journal read back from storage is untrusted: it cannot delete outside the archive.
    outside = tmp_path / "precious.parquet"
    outside.write_bytes(b"not the archive's")
    (journal / "3.json").write_text(json.dumps({"old": str(outside), "new": None}))

    assert finish_rewrites(str(archive), STORAGE) == 3

    assert not old.exists() and new.exists() and kept.exists() and outside.exists()
    assert list(journal.iterdir()) == []
    assert _rows(archive) == [("a", None), ("c", None)]


def test_without_retryable_rows_nothing_is_read(tmp_path, monkeypatch):
    """The footers say no file holds a retryable error row: no row is read, nothing rewritten."""
    archive = tmp_path / "archive"
    _file(archive, "part-1-x.parquet", [("a", None, EARLY), ("b", "not an image: text", EARLY)])
    _file(archive, "part-2-y.parquet", [("a", None, EARLY + timedelta(hours=1))])

    def no_rows(*args, **kwargs):
        raise AssertionError("supersede read rows")

    monkeypatch.setattr("pipeline.supersede.read_data_file", no_rows)
    assert supersede_retried(str(archive), STORAGE) == Superseded(rows=0, files=0)
    _file(archive, "part-3-z.parquet", [("c", retryable("read failed", "timeout"), EARLY)])
    with pytest.raises(AssertionError, match="supersede read rows"):
        supersede_retried(str(archive), STORAGE)


def test_only_the_files_with_retryable_rows_are_read_for_errors(tmp_path, monkeypatch):
    """What the driver holds is set by the retryable rows: their files' errors are read, and
    of every other file only the key and time columns, kept for the retried keys alone."""
    import pipeline.supersede

    archive = tmp_path / "archive"
    lost = retryable("worker died", "killed by SIGKILL")
    _file(archive, "part-1-x.parquet", [("a", None, EARLY), ("b", lost, EARLY)])
    _file(archive, "part-2-y.parquet", [(f"k{i}", None, EARLY) for i in range(50)] + [("b", None, EARLY + timedelta(1))])
    read, reads = pipeline.supersede.read_data_file, []

    def recorded(path, fs, columns):
        reads.append((Path(path).name, tuple(columns or ())))
        return read(path, fs, columns)

    monkeypatch.setattr(pipeline.supersede, "read_data_file", recorded)
    newest = pipeline.supersede._newest_rows(str(archive), STORAGE, pa.array(["b"]))
    assert newest == {"b": EARLY + timedelta(1)}
    reads.clear()
    assert supersede_retried(str(archive), STORAGE) == Superseded(rows=1, files=1)
    assert ("part-1-x.parquet", ("key", "error", "created_at")) in reads
    assert [columns for name, columns in reads if name == "part-2-y.parquet"] == [("key", "created_at")]
    assert _rows(archive) == sorted([("a", None), ("b", None)] + [(f"k{i}", None) for i in range(50)])

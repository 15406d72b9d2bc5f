"""The archive's data files: rows sorted by key in small row groups, so that reading a few
keys or a sample reads the files and row groups that hold them, not the archive
(pipeline/archive.py, pipeline/selection.py)."""

from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from pipeline.archive import ROW_GROUP_ROWS, SCHEMA, data_file_bytes, read_data_file_rows
from pipeline.selection import ArchiveFile, archive_files, key_rows
from pipeline.storage import StorageConfig

from archives import damage_a_page

ROWS = 3 * ROW_GROUP_ROWS + 5


@pytest.fixture
def data_file(tmp_path):
    keys = [f"k{(i * 7919) % ROWS:04d}" for i in range(ROWS)]  # written in no order
    table = pa.Table.from_pylist([{"key": key, "source_uri": f"/in/{key}", "error": f"row of {key}",
                                   "created_at": datetime.now(timezone.utc), "job_id": "j"} for key in keys],
                                 schema=SCHEMA)
    path = tmp_path / "part-j-0.parquet"
    path.write_bytes(data_file_bytes(table))
    return path


def test_rows_are_sorted_by_key_in_row_groups(data_file):
    metadata = pq.read_metadata(data_file)
    assert metadata.num_row_groups == 4 and metadata.row_group(0).num_rows == ROW_GROUP_ROWS
    assert pq.read_table(data_file, columns=["key"])["key"].to_pylist() == [f"k{i:04d}" for i in range(ROWS)]


def test_keys_are_read_from_the_row_groups_that_hold_them_alone(data_file):
    """A damaged page in the last row group does not stop reading keys held elsewhere: that
    group is never read (were it, its checksum would fail, as the last read shows)."""
    damage_a_page(data_file, column="error", row_group=3)
    fs = LocalFileSystem()
    wanted = ("k0001", "k0070", "nothing")
    table, positions = read_data_file_rows(str(data_file), fs, ["key", "error"], keys=wanted)
    assert dict(zip(table["key"].to_pylist(), positions.to_pylist())) == {"k0001": 1, "k0070": 70}
    assert table["error"].to_pylist() == ["row of k0001", "row of k0070"]
    assert read_data_file_rows(str(data_file), fs, ["key"], keys=("a", "zzz"))[0].num_rows == 0  # outside every range
    sample, positions = read_data_file_rows(str(data_file), fs, ["key"], rows=[3, 65, 66])
    assert sample["key"].to_pylist() == ["k0003", "k0065", "k0066"] and positions.to_pylist() == [3, 65, 66]
    with pytest.raises(OSError):
        read_data_file_rows(str(data_file), fs, ["key", "error"], keys=("k0195",))


def test_records_are_read_only_where_a_key_is_there(data_file):
    """A key inside a row group's range but not in it: the group's key column is read, its
    other columns are not (were they, the damaged page's checksum would fail)."""
    damage_a_page(data_file, column="error", row_group=1)  # keys k0064 to k0127
    fs = LocalFileSystem()
    table, positions = read_data_file_rows(str(data_file), fs, ["key", "error"], keys=("k0001", "k0070a"))
    assert table["key"].to_pylist() == ["k0001"] and positions.to_pylist() == [1]
    with pytest.raises(OSError, match="(?i)checksum"):
        read_data_file_rows(str(data_file), fs, ["key", "error"], keys=("k0070",))


def _old_file(path, keys) -> None:
    """A data file as written before sorted row groups: one row group, rows in any order."""
    pq.write_table(pa.Table.from_pylist([{"key": key, "source_uri": "/in", "error": f"row of {key}",
                                          "created_at": datetime.now(timezone.utc), "job_id": "j"} for key in keys],
                                        schema=SCHEMA), path)


def test_files_written_before_sorted_row_groups_read_as_before(tmp_path):
    """One row group, any order: every key may be anywhere, so the group's keys are read, and
    its records where a key is there."""
    path = tmp_path / "old.parquet"
    _old_file(path, ("b", "a", "c"))
    rows, positions = read_data_file_rows(str(path), LocalFileSystem(), ["key", "error"], keys=("a", "bb"))
    assert rows.to_pylist() == [{"key": "a", "error": "row of a"}] and positions.to_pylist() == [1]
    rows, positions = read_data_file_rows(str(path), LocalFileSystem(), ["key"])
    assert rows["key"].to_pylist() == ["b", "a", "c"] and positions.to_pylist() == [0, 1, 2]


def test_a_restore_of_a_few_keys_opens_only_the_files_whose_range_can_hold_them(tmp_path):
    """The footers give each file its key range; only files whose range can hold a wanted
    key are selected. A file written before sorted row groups has the range of its keys in
    any order: wide, so it is selected more often, never wrongly left out."""
    for name, keys in (("part-j-a.parquet", ("a1", "a2", "a3")), ("part-j-c.parquet", ("c1", "c2")),
                       ("part-j-e.parquet", ("e1", "e9"))):
        (tmp_path / name).write_bytes(data_file_bytes(pa.Table.from_pylist(
            [{"key": key, "source_uri": "/in", "created_at": datetime.now(timezone.utc), "job_id": "j"}
             for key in keys], schema=SCHEMA)))
    _old_file(tmp_path / "part-old.parquet", ("d5", "b5", "d1"))
    (tmp_path / "part-broken.parquet").write_bytes(b"not parquet")
    files = {f.path.rsplit("/", 1)[1]: f for f in archive_files(str(tmp_path), StorageConfig())}
    assert {name: f.keys for name, f in files.items()} == {
        "part-j-a.parquet": ("a1", "a3"), "part-j-c.parquet": ("c1", "c2"), "part-j-e.parquet": ("e1", "e9"),
        "part-old.parquet": ("b5", "d5"), "part-broken.parquet": None}

    def selected(*keys: str) -> set[str]:
        return {s.path.rsplit("/", 1)[1] for s in key_rows(list(files.values()), frozenset(keys))}

    assert selected("a2") == {"part-j-a.parquet"}
    assert selected("c1", "e5") == {"part-j-c.parquet", "part-old.parquet", "part-j-e.parquet"}
    assert selected("b0", "f", "0") == set()  # the broken file is reported by the job, never read
    assert selected("e1", "zz") == {"part-j-e.parquet"}
    unknown = ArchiveFile("s3://bucket/part-no-statistics.parquet", 3)  # no range: any key may be there
    assert [s.path for s in key_rows([unknown], frozenset({"x"}))] == [unknown.path]

"""The archive's data files: rows sorted by key in small row groups, so that reading a few
keys or a sample reads the row groups that hold them, not the files (pipeline/archive.py)."""

from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from pipeline.archive import ROW_GROUP_ROWS, SCHEMA, data_file_bytes, read_data_file_rows

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
    found = {key: position for key, position in zip(table["key"].to_pylist(), positions.to_pylist()) if key in wanted}
    assert found == {"k0001": 1, "k0070": 70}
    assert table.num_rows == 2 * ROW_GROUP_ROWS  # groups 0 and 1, not 2 and 3
    assert read_data_file_rows(str(data_file), fs, ["key"], keys=("a", "zzz"))[0].num_rows == 0  # outside every range
    sample, positions = read_data_file_rows(str(data_file), fs, ["key"], rows=[3, 65, 66])
    assert sample["key"].to_pylist() == ["k0003", "k0065", "k0066"] and positions.to_pylist() == [3, 65, 66]
    with pytest.raises(OSError):
        read_data_file_rows(str(data_file), fs, ["key", "error"], keys=("k0195",))


def test_files_written_before_sorted_row_groups_read_as_before(tmp_path):
    """One row group, any order: every key may be anywhere, so the whole file is read."""
    table = pa.Table.from_pylist([{"key": key, "source_uri": "/in", "created_at": datetime.now(timezone.utc),
                                   "job_id": "j"} for key in ("b", "a", "c")], schema=SCHEMA)
    path = tmp_path / "old.parquet"
    pq.write_table(table, path)
    rows, positions = read_data_file_rows(str(path), LocalFileSystem(), ["key"], keys=("a",))
    assert rows["key"].to_pylist() == ["b", "a", "c"] and positions.to_pylist() == [0, 1, 2]

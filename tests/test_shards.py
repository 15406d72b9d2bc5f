"""Shard completion markers (pipeline/shards.py): when a shard counts as finished, and what
a rerun reads. The end-to-end runs are in test_compress.py (test_tar_shards, test_parquet_input)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pytest
import ray

from pipeline.archive import SCHEMA, data_file_bytes
from pipeline.shards import ShardLedger, finished_shards, marker_name, resume_shards, shard_ref
from pipeline.sources import SourceConfig, list_shards
from pipeline.storage import StorageConfig

from archives import write_tar_shard

STORAGE = StorageConfig()


def _listing(*shards: tuple[str, int, str]) -> pa.Table:
    keys = [key for key, _, _ in shards]
    return pa.table({"key": keys, "source_uri": [f"/in/{key}" for key in keys],
                     "size": [size for _, size, _ in shards], "version": [version for _, _, version in shards]})


def _markers(archive: Path) -> dict[str, dict]:
    folder = archive / "_shards"
    return {m["shard"]: m for m in (json.loads(p.read_text()) for p in folder.iterdir())} if folder.exists() else {}


def test_a_shard_is_marked_once_all_its_rows_are_written_in_any_order(ray_local, tmp_path):
    archive = tmp_path / "archive"
    ledger = ShardLedger.remote(str(archive), STORAGE, "tar", "job", _listing(("a.tar", 10, "v1"), ("b.tar", 20, "v1")))
    ray.get(ledger.written.remote("part-1.parquet", {"a.tar": (2, 0)}))  # rows can be written before the read ends
    ray.get(ledger.emitted.remote("a.tar", 3))
    assert _markers(archive) == {}
    ray.get(ledger.written.remote("part-1.parquet", {"a.tar": (2, 0)}))  # a retried write task: the same file again
    assert _markers(archive) == {}
    ray.get(ledger.written.remote("part-2.parquet", {"a.tar": (1, 0), "b.tar": (1, 0)}))
    assert set(_markers(archive)) == {"a.tar"} and _markers(archive)["a.tar"]["rows"] == 3
    ray.get(ledger.emitted.remote("b.tar", 1))
    assert set(_markers(archive)) == {"a.tar", "b.tar"} and ray.get(ledger.finished.remote()) == 2
    names = {p.name for p in (archive / "_shards").iterdir()}
    assert names == {marker_name("a.tar", 10, "v1"), marker_name("b.tar", 20, "v1")}


def test_a_shard_with_a_retryable_row_or_nothing_left_to_do(ray_local, tmp_path):
    archive = tmp_path / "archive"
    ledger = ShardLedger.remote(str(archive), STORAGE, "tar", "job", _listing(("a.tar", 1, None), ("b.tar", 1, None)))
    ray.get(ledger.emitted.remote("a.tar", 2))
    ray.get(ledger.written.remote("part-1.parquet", {"a.tar": (2, 1)}))  # a rerun must retry that row: not finished
    ray.get(ledger.emitted.remote("b.tar", 0))  # every member archived before: finished at once
    assert set(_markers(archive)) == {"b.tar"}


def test_a_marker_counts_only_for_the_shard_as_it_was(tmp_path):
    """A shard rewritten since (another size or version) is read again."""
    (tmp_path / "_shards").mkdir()
    (tmp_path / "_shards" / marker_name("a.tar", 10, "v1")).write_text("{}")
    (tmp_path / "_shards" / marker_name("b.tar", 10, "v1")).write_text("{}")
    listing = _listing(("a.tar", 10, "v1"), ("b.tar", 10, "v2"), ("c.tar", 10, "v1"))
    assert finished_shards(str(tmp_path), STORAGE, listing) == {"a.tar"}


def test_shard_refs_name_the_shard_of_every_kind_of_row():
    assert shard_ref("tar", "x/a.tar/b/c.jpg", "/in/x/a.tar#b/c.jpg") == "x/a.tar"
    assert shard_ref("tar", "a.tar/c.jpg#2", "/in/a.tar#c.jpg") == "a.tar"  # a second copy of a member
    assert shard_ref("tar", "a.tar/#shard", "/in/a.tar") == "a.tar"
    assert shard_ref("parquet", "id#7", "s3://b/t/f.parquet#id#7") == "s3://b/t/f.parquet"
    assert shard_ref("parquet", "t/f/#file", "s3://b/t/f.parquet") == "s3://b/t/f.parquet"
    with pytest.raises(ValueError):
        shard_ref("tar", "sub/a.jpg", "/in/sub/a.jpg")


def test_a_rerun_reads_the_unfinished_shards_with_their_own_done_keys(ray_local, tmp_path):
    """Only the keys of shards that are read again are held: the finished shard's are not."""
    (tmp_path / "in").mkdir()
    for name in ("a.tar", "b.tar"):
        write_tar_shard(tmp_path / "in" / name, {"0.jpg": b"x", "1.jpg": b"y"})
    source = SourceConfig(url=str(tmp_path / "in"), kind="tar")
    listing = list_shards(source, STORAGE)
    archive = tmp_path / "archive"
    archive.mkdir()
    rows = [{"key": key, "source_uri": f"{tmp_path}/in/{key.replace('.tar/', '.tar#')}", "error": error,
             "created_at": datetime.now(timezone.utc), "job_id": "old"}
            for key, error in [("a.tar/0.jpg", None), ("a.tar/1.jpg", None), ("b.tar/0.jpg", None),
                               ("b.tar/1.jpg", "worker died (retryable): killed")]]
    (archive / "part-old.parquet").write_bytes(data_file_bytes(pa.Table.from_pylist(rows, schema=SCHEMA)))
    items = listing.items.to_pylist()
    (archive / "_shards").mkdir()
    (archive / "_shards" / marker_name("a.tar", items[0]["size"], items[0]["version"])).write_text("{}")

    resume = resume_shards(str(archive), STORAGE, "tar", listing, "new")
    assert resume.listing.items["key"].to_pylist() == ["b.tar"] and resume.finished_before == 1
    # b.tar's retryable row is retried; a.tar's keys are not held, b.tar's travel with its row.
    assert resume.done_keys == 1 and resume.listing.items["done"].to_pylist() == [["b.tar/0.jpg"]]


def test_markers_on_s3_see_a_rewritten_shard(s3_server):
    """On S3 a shard's version is its ETag: rewritten with the same size, it is read again."""
    bucket = s3_server.make_bucket({"in/a.tar": b"1" * 1024, "in/b.tar": b"2" * 1024})
    source = SourceConfig(url=f"{bucket}/in", kind="tar")
    items = list_shards(source, s3_server.storage).items
    assert all(version.startswith("ETag=") for version in items["version"].to_pylist())
    for key, size, version in zip(items["key"].to_pylist(), items["size"].to_pylist(), items["version"].to_pylist()):
        s3_server.put(f"{bucket}/archive/_shards/{marker_name(key, size, version)}", b"{}")
    assert finished_shards(f"{bucket}/archive", s3_server.storage, items) == {"a.tar", "b.tar"}
    s3_server.put(f"{bucket}/in/a.tar", b"3" * 1024)
    items = list_shards(source, s3_server.storage).items
    assert finished_shards(f"{bucket}/archive", s3_server.storage, items) == {"b.tar"}

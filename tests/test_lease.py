"""One writer per archive (pipeline.lease) and idempotent archive files, locally and on moto's S3."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pytest
from ray.data._internal.execution.interfaces import TaskContext

from pipeline.archive import SCHEMA, ArchiveDatasink, list_data_files, read_columns
from pipeline.lease import LEASE_FILE, ArchiveBusyError, archive_lease
from pipeline.storage import StorageConfig, filesystem


@pytest.fixture(params=["local", "s3"])
def archive(request, tmp_path) -> tuple[str, StorageConfig]:
    if request.param == "local":
        return str(tmp_path / "archive"), StorageConfig()
    s3 = request.getfixturevalue("s3_server")
    return f"{s3.make_bucket()}/archive", s3.storage


def _lease_content(url: str, storage: StorageConfig) -> dict:
    fs, root = filesystem(url, storage)
    return json.loads(fs.cat_file(f"{root}/{LEASE_FILE}"))


def test_a_second_run_is_refused_while_the_first_holds_the_lease(archive):
    url, storage = archive
    with archive_lease(url, storage, "first") as held:
        assert _lease_content(url, storage)["token"] == held["token"]
        with pytest.raises(ArchiveBusyError, match="being written by job 'first'"):
            with archive_lease(url, storage, "second"):
                pass
        assert _lease_content(url, storage)["job_id"] == "first"  # the refused run left it alone
    with archive_lease(url, storage, "second"):  # released at the end of the first
        assert _lease_content(url, storage)["job_id"] == "second"
    fs, root = filesystem(url, storage)
    assert not fs.exists(f"{root}/{LEASE_FILE}")


def test_a_dead_runs_lease_goes_stale_and_is_taken_over(archive):
    url, storage = archive
    fs, root = filesystem(url, storage)
    fs.makedirs(root, exist_ok=True)
    dead = {"job_id": "dead", "token": "x", "host": "gone", "pid": 1, "renewed_at": time.time() - 3600}
    fs.pipe_file(f"{root}/{LEASE_FILE}", json.dumps(dead).encode())
    with pytest.raises(ArchiveBusyError):
        with archive_lease(url, storage, "new", stale_after_s=7200):
            pass
    with archive_lease(url, storage, "new", stale_after_s=600):
        assert _lease_content(url, storage)["job_id"] == "new"


def test_the_lease_of_a_killed_run_on_this_host_is_taken_over_at_once(tmp_path):
    """kill -9 of a local job leaves its lease; the rerun need not wait for it to go stale."""
    url = str(tmp_path / "archive")
    holder = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                            text=True, check=True)
    fs, root = filesystem(url, StorageConfig())
    fs.makedirs(root, exist_ok=True)
    dead = {"job_id": "killed", "token": "x", "host": socket.gethostname(), "pid": int(holder.stdout),
            "renewed_at": time.time()}
    fs.pipe_file(f"{root}/{LEASE_FILE}", json.dumps(dead).encode())
    with archive_lease(url, StorageConfig(), "rerun"):
        assert _lease_content(url, StorageConfig())["job_id"] == "rerun"
    alive = {**dead, "pid": os.getpid()}  # this very process: alive, so the lease holds
    fs.pipe_file(f"{root}/{LEASE_FILE}", json.dumps(alive).encode())
    with pytest.raises(ArchiveBusyError):
        with archive_lease(url, StorageConfig(), "rerun"):
            pass


def test_the_lease_is_renewed_while_the_run_goes_on(tmp_path):
    url = str(tmp_path / "archive")
    with archive_lease(url, StorageConfig(), "long", renew_every_s=0.05):
        first = _lease_content(url, StorageConfig())["renewed_at"]
        deadline = time.time() + 10  # a busy machine may run the renewing thread late, never not at all
        while time.time() < deadline and _lease_content(url, StorageConfig())["renewed_at"] == first:
            time.sleep(0.05)
        assert _lease_content(url, StorageConfig())["renewed_at"] > first


def test_a_retried_write_task_replaces_its_own_file(archive):
    """Ray retries a write task whose worker died after the rename: the same rows must not
    land a second time under another name."""
    url, storage = archive
    sink = ArchiveDatasink(url, storage, {}, "job", rows_per_file=10)
    sink.on_write_start()
    rows = pa.Table.from_pylist([{"key": f"k{i}", "source_uri": f"/in/k{i}", "error": "e", "job_id": "job",
                                  "created_at": pa.scalar(0, pa.timestamp("us", tz="UTC")).as_py()}
                                 for i in range(3)], schema=SCHEMA)
    for attempt in range(2):
        sink.write([rows], TaskContext(task_idx=attempt, op_name="Write"))
    assert len(list_data_files(url, storage)) == 1
    assert sorted(read_columns(url, storage, ["key"]).column("key").to_pylist()) == ["k0", "k1", "k2"]


def test_a_compress_run_into_an_archive_being_written_stops_before_touching_it(tiny_model, tmp_path):
    """The other run's file in flight survives; today's run would have deleted it as a leftover."""
    from pipeline.compress import CodecSettings, CompressConfig, run_compress
    from pipeline.sources import SourceConfig

    archive = tmp_path / "archive"
    (tmp_path / "in").mkdir()
    config = CompressConfig(input=SourceConfig(url=str(tmp_path / "in")), output=str(archive),
                            codec=CodecSettings(model=str(tiny_model), device="cpu"))
    with archive_lease(str(archive), StorageConfig(), "other"):
        in_flight = archive / ".tmp-1a2b3c4d-part-other-0123456789abcdef.parquet"
        in_flight.write_bytes(b"PAR1 being written")
        with pytest.raises(ArchiveBusyError, match="job 'other'"):
            run_compress(config)
        assert in_flight.exists() and not (archive / "_models").exists()

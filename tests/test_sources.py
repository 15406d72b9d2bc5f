"""Storage access and image sources: listing in tasks, keys, URIs, bytes, resume filtering
(the anti-join against the archive, done keys of shards) and failures as rows."""

from __future__ import annotations

import dataclasses
import errno
import io
import socket
import tarfile
from pathlib import Path

import botocore.exceptions
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem
from PIL import Image

from pipeline import listing as listing_module
from pipeline import pending as pending_module
from pipeline import storage as storage_module
from pipeline.archive import SCHEMA, data_file_bytes
from pipeline.errors import is_retryable, retryable
from pipeline.listing import LISTING_SCHEMA, ImageListing, ManifestError
from pipeline.pending import DuplicateKeysError, pending_images
from pipeline.shards import with_done_keys
from pipeline.skipped import Skipped
from pipeline.sources import (OUTPUT_SCHEMA, SourceConfig, SourceRead, _fetch_one, _parquet_tables, _tar_rows,
                              list_images, list_shards, read_images, read_shards, split_parquet_uri, split_tar_uri)
from pipeline.storage import StorageConfig, filesystem, is_transient, with_retries

LOCAL = StorageConfig(retry_wait=0.01)
LOCAL_FS = fsspec.filesystem("file")


def png(seed: int, size: tuple[int, int] = (6, 4)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (seed * 40 % 256, seed * 90 % 256, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


def noise_png(seed: int, size: tuple[int, int] = (40, 40)) -> bytes:
    """A PNG that does not compress: its size grows with its pixels, to exceed a cap."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def too_large(size: int, cap: int) -> str:
    return f"image file too large: {size:,} bytes, over max_image_bytes ({cap:,})"


def collect(read: SourceRead) -> dict[str, dict]:
    """Every row by key, after checking the exact output schema and key uniqueness."""
    tables = [table for table in ray.get(read.dataset.to_arrow_refs()) if table.num_rows]
    table = pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.empty_table()
    assert table.schema.equals(OUTPUT_SCHEMA), table.schema
    rows = table.to_pylist()
    assert len({row["key"] for row in rows}) == len(rows), "keys must be unique"
    return {row["key"]: row for row in rows}


def listed_keys(listing: ImageListing) -> list[str]:
    return sorted(key for table in ray.get(listing.blocks) for key in table["key"].to_pylist())


def write_archive(root: Path, keys: list[str], errors: list[str | None] | None = None,
                  metadata: dict[str, str] | None = None) -> str:
    """An archive folder with one data file (the project's schema and writer) holding a row
    for each key: what a rerun finds already done."""
    count = len(keys)
    given = {"key": pa.array(keys, pa.string()), "source_uri": pa.array(keys, pa.string()),
             "error": pa.array(errors or [None] * count, pa.string()), "job_id": pa.array(["test"] * count),
             "created_at": pa.array([0] * count, pa.int64()).cast(pa.timestamp("us", tz="UTC"))}
    table = pa.table({name: given.get(name, pa.nulls(count, SCHEMA.field(name).type)) for name in SCHEMA.names},
                     schema=SCHEMA.with_metadata(metadata or {}))
    root.mkdir(parents=True, exist_ok=True)
    (root / "part-test-00000.parquet").write_bytes(data_file_bytes(table))
    return str(root)


def read_pending(source: SourceConfig, storage: StorageConfig, archive: str, rows_per_block: int = 64) -> SourceRead:
    """What a compress run over a files or manifest source reads, given its archive."""
    return read_images(pending_images(list_images(source, storage), archive, storage), source, storage,
                       rows_per_block)


def read_listed_shards(source: SourceConfig, storage: StorageConfig, done_keys: set[str] = frozenset(),
                       rows_per_block: int = 64) -> SourceRead:
    """The listed shards read with ``done_keys`` given to every shard (a shard skips those of its own)."""
    listing = list_shards(source, storage)
    items = with_done_keys(listing.items, "key", {shard: set(done_keys) for shard in listing.items["key"].to_pylist()})
    return read_shards(source, storage, dataclasses.replace(listing, items=items), rows_per_block)


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def tar_layout(data: bytes) -> dict[str, tuple[int, int]]:
    """Where each member's header starts and its data ends, to cut a shard at a chosen place."""
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        return {member.name: (member.offset, member.offset_data + member.size) for member in archive.getmembers()}


def parquet_bytes(keys: list[str], images: list[bytes | None], row_group_size: int | None = None) -> bytes:
    buffer = io.BytesIO()
    table = pa.table({"id": keys, "bytes": pa.array(images, pa.binary()), "label": list(range(len(keys)))})
    pq.write_table(table, buffer, row_group_size=row_group_size)
    return buffer.getvalue()


# Storage ---------------------------------------------------------------------------------


def client_error(code: str, status: int) -> botocore.exceptions.ClientError:
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
    )


def wrapped(error: BaseException) -> OSError:
    """What s3fs raises for an S3 error code it does not know: OSError(EIO) caused by it."""
    oserror = OSError(errno.EIO, str(error))
    oserror.__cause__ = error
    return oserror


@pytest.mark.parametrize(
    "error, transient",
    [
        (ConnectionResetError("reset"), True),
        (TimeoutError("slow"), True),
        (OSError(errno.EIO, "i/o"), True),
        (OSError(errno.EBUSY, "SlowDown"), True),
        (botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"), True),
        (client_error("SlowDown", 503), True),
        (client_error("Whatever", 500), True),
        (wrapped(client_error("Whatever", 502)), True),
        (FileNotFoundError("gone"), False),
        (PermissionError("denied"), False),
        (IsADirectoryError("dir"), False),
        (NotADirectoryError("file"), False),
        (OSError(errno.EINVAL, "InvalidRange"), False),
        (wrapped(client_error("Whatever", 400)), False),
        (client_error("AccessDenied", 403), False),
        (botocore.exceptions.NoCredentialsError(), False),
        (ValueError("bad"), False),
    ],
)
def test_is_transient(error, transient):
    assert is_transient(error) is transient


def test_with_retries_backs_off_then_succeeds(monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(storage_module.time, "sleep", waits.append)
    failures = iter([ConnectionResetError("1"), TimeoutError("2"), OSError(errno.EIO, "3")])

    def flaky() -> str:
        error = next(failures, None)
        if error:
            raise error
        return "ok"

    assert with_retries(flaky, StorageConfig(retries=4, retry_wait=0.5), "flaky") == "ok"
    assert waits == [0.5, 1.0, 2.0]


def test_with_retries_gives_up_after_the_attempts(monkeypatch):
    monkeypatch.setattr(storage_module.time, "sleep", lambda seconds: None)
    calls = []

    def down() -> None:
        calls.append(1)
        raise ConnectionRefusedError("down")

    with pytest.raises(ConnectionRefusedError) as raised:
        with_retries(down, StorageConfig(retries=3), "ping")
    assert len(calls) == 3
    assert raised.value.__notes__ == ["ping: gave up after 3 attempts"]


def test_with_retries_never_retries_permanent_errors(monkeypatch):
    monkeypatch.setattr(storage_module.time, "sleep", lambda seconds: pytest.fail("slept"))
    calls = []

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("no such key")

    with pytest.raises(FileNotFoundError):
        with_retries(missing, StorageConfig(retries=5), "read")
    assert len(calls) == 1


def test_fsspec_options_per_protocol():
    config = StorageConfig(endpoint_url="http://127.0.0.1:9", key="k", secret="s", region="eu-west-1")
    assert config.fsspec_options("/data/photos") == {}
    assert config.fsspec_options("file:///data/photos") == {}
    assert config.fsspec_options("s3://bucket/prefix") == {
        "endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s", "client_kwargs": {"region_name": "eu-west-1"},
    }
    assert StorageConfig().fsspec_options("s3://bucket") == {}  # all from the environment
    assert StorageConfig(anon=True).fsspec_options("gs://bucket") == {"token": "anon"}
    assert StorageConfig(key="k").fsspec_options("memory://x") == {"key": "k"}


def test_config_credentials_take_precedence_over_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-environment")
    fs, path = filesystem("s3://bucket/prefix/a.jpg", StorageConfig(key="from-config", secret="s"))
    assert (fs.key, path) == ("from-config", "bucket/prefix/a.jpg")


# files ------------------------------------------------------------------------------------


def test_files_local_keys_uris_bytes_resume_and_a_vanished_file(tmp_path, ray_local):
    files = {"a.png": png(1), "sub/b.JPG": png(2), "sub/deeper/c.jpeg": png(3), "sub/d.png": png(4)}
    write_files(tmp_path, {**files, "notes.txt": b"not an image", "sub/e.json": b"{}"})
    source = SourceConfig(url=str(tmp_path))

    assert listed_keys(list_images(source, LOCAL)) == ["a.png", "sub/b.JPG", "sub/d.png", "sub/deeper/c.jpeg"]

    archive = write_archive(tmp_path.parent / f"{tmp_path.name}-archive", ["a.png"])
    dataset = read_pending(source, LOCAL, archive, rows_per_block=2)
    (tmp_path / "sub/d.png").unlink()  # listed, gone before the tasks read it
    rows = collect(dataset)

    assert sorted(rows) == ["sub/b.JPG", "sub/d.png", "sub/deeper/c.jpeg"]
    for key in ("sub/b.JPG", "sub/deeper/c.jpeg"):
        assert rows[key]["source_uri"] == str(tmp_path / key)
        assert (rows[key]["data"], rows[key]["error"]) == (files[key], None)
    assert rows["sub/d.png"]["data"] is None
    assert rows["sub/d.png"]["error"] == "read failed: not found"

    write_archive(Path(archive), list(files))
    assert collect(read_pending(source, LOCAL, archive)) == {}


def test_files_on_s3_with_credentials_from_the_environment(s3_server, ray_local):
    files = {"photos/a.jpg": png(1), "photos/sub/b.png": png(2)}
    big = noise_png(3)
    bucket = s3_server.make_bucket({**files, "photos/big.png": big, "photos/readme.md": b"#", "photos2/c.jpg": png(3)})
    environment_only = StorageConfig(endpoint_url=s3_server.endpoint_url)
    cap = len(big) - 1

    read = read_pending(SourceConfig(url=f"{bucket}/photos/", max_image_bytes=cap), environment_only,
                        f"{bucket}/archive/")
    rows = collect(read)

    assert sorted(rows) == ["a.jpg", "big.png", "sub/b.png"]  # photos2/ shares the prefix string, not the folder
    for key, row in rows.items():
        assert row["source_uri"] == f"{bucket}/photos/{key}"
        if key != "big.png":
            assert (row["data"], row["error"]) == (files[f"photos/{key}"], None)
    assert (rows["big.png"]["data"], rows["big.png"]["error"]) == (None, too_large(len(big), cap))
    assert read.skipped().report() == {"count": 1, "by_extension": {".md": {"count": 1, "examples": ["readme.md"]}}}


def test_no_images_is_an_error_not_an_empty_archive(tmp_path, ray_local):
    write_files(tmp_path, {"notes.txt": b"x"})
    with pytest.raises(FileNotFoundError, match="no images"):
        list_images(SourceConfig(url=str(tmp_path)), LOCAL)
    with pytest.raises(FileNotFoundError, match="no images"):
        list_images(SourceConfig(url=str(tmp_path / "does-not-exist")), LOCAL)


def test_files_the_extension_filter_skips_are_counted_with_examples(tmp_path, ray_local):
    """A folder of camera raw files beside one JPEG must say what it left out."""
    raw = {f"raw/{i:02d}.CR2": b"raw sensor data" for i in range(7)}
    write_files(tmp_path, {"a.jpg": png(1), "notes.txt": b"x", "Makefile": b"all:", **raw})

    listing = list_images(SourceConfig(url=str(tmp_path)), LOCAL)

    assert listed_keys(listing) == ["a.jpg"]
    assert listing.skipped.report() == {"count": 9, "by_extension": {
        ".cr2": {"count": 7, "examples": [f"raw/{i:02d}.CR2" for i in range(5)]},
        "": {"count": 1, "examples": ["Makefile"]},
        ".txt": {"count": 1, "examples": ["notes.txt"]},
    }}


def test_no_images_says_what_it_skipped(tmp_path, ray_local):
    write_files(tmp_path, {**{f"{i}.cr2": b"raw" for i in range(3)}, "notes.txt": b"x"})
    with pytest.raises(FileNotFoundError, match=r"no images .* skipped 4 other files, 3 \.cr2, 1 \.txt"):
        list_images(SourceConfig(url=str(tmp_path), extensions=(".jpg",)), LOCAL)


def test_a_deep_prefix_is_listed_level_by_level_in_several_tasks(tmp_path, ray_local, monkeypatch):
    """Folders are listed a few per task, level after level; the keys are those of one find."""
    monkeypatch.setattr(listing_module, "FOLDERS_PER_TASK", 2)
    files = {f"{a}/{b}/{c}.png": png(1) for a in "xyz" for b in "pq" for c in range(2)} | {"top.png": png(2)}
    write_files(tmp_path, {**files, "y/q/skip.txt": b"-"})

    listing = list_images(SourceConfig(url=str(tmp_path)), LOCAL)

    assert listed_keys(listing) == sorted(files)
    assert listing.rows == len(files) and len(listing.blocks) > 2
    assert listing.skipped.report()["by_extension"] == {".txt": {"count": 1, "examples": ["y/q/skip.txt"]}}


def test_a_rerun_reads_what_the_archive_lacks_and_retries_retryable_errors(tmp_path, ray_local, monkeypatch):
    """The anti-join runs in several partitions; a key whose only row is a retryable error
    is read again, one with a final error is not."""
    monkeypatch.setattr(pending_module, "PARTITION_ROWS", 3)
    files = {f"{i:02d}.png": png(i) for i in range(11)}
    write_files(tmp_path / "in", files)
    archive = write_archive(tmp_path / "archive", ["00.png", "01.png", "02.png", "03.png", "04.png"],
                            [None, None, retryable("read failed", "timeout"), "corrupt or truncated image: x", None])
    listing = list_images(SourceConfig(url=str(tmp_path / "in")), LOCAL)

    pending = pending_images(listing, archive, LOCAL)

    assert (pending.rows, pending.archived) == (7, 4)
    assert sorted(collect(read_images(pending, SourceConfig(url=str(tmp_path / "in")), LOCAL))) == \
        ["02.png", *[f"{i:02d}.png" for i in range(5, 11)]]


def listing_of(*blocks: list[str]) -> ImageListing:
    """A listing of these blocks of keys (each key's URI a local path), in the object store."""
    tables = [pa.table({"key": keys, "source_uri": [f"/in/{key}" for key in keys], "path": [None] * len(keys),
                        "size": pa.nulls(len(keys), pa.int64()), "version": [None] * len(keys)},
                       schema=LISTING_SCHEMA) for keys in blocks]
    return ImageListing([ray.put(table) for table in tables], [table.num_rows for table in tables], Skipped(), None,
                        "test listing")


def test_the_anti_join_splits_both_sides_in_shares_and_finds_duplicates_across_them(tmp_path, ray_local,
                                                                                     monkeypatch):
    """Shares of a few listed rows and one archive file each, several partitions: what is left
    to read and the duplicates are those of the whole listing, wherever the rows fell."""
    monkeypatch.setattr(pending_module, "PARTITION_ROWS", 3)
    monkeypatch.setattr(pending_module, "SHARE_ROWS", 4)
    monkeypatch.setattr(pending_module, "SHARE_FILES", 1)
    archive = write_archive(tmp_path / "archive", ["k00", "k01", "k02"])
    (tmp_path / "archive" / "part-test-00000.parquet").rename(tmp_path / "archive" / "part-test-00001.parquet")
    write_archive(tmp_path / "archive", ["k07", "k08"])
    keys = [f"k{i:02d}" for i in range(12)]

    pending = pending_images(listing_of(keys[:3], keys[3:5], keys[5:9], keys[9:]), archive, LOCAL)

    assert (pending.rows, pending.archived) == (7, 5)
    assert sorted(key for table in ray.get(pending.blocks) for key in table["key"].to_pylist()) == \
        ["k03", "k04", "k05", "k06", "k09", "k10", "k11"]
    with pytest.raises(DuplicateKeysError, match=r"2 duplicate keys.*'k01', 'k10'"):
        pending_images(listing_of(keys[:3], keys[3:9], ["k10", "k01"], keys[9:]), archive, LOCAL)


def test_shares_are_contiguous_runs_within_the_limit():
    assert pending_module._shares([2, 2, 1, 5, 1, 1], 4) == [slice(0, 2), slice(2, 3), slice(3, 4), slice(4, 6)]
    assert pending_module._shares([1] * 5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert pending_module._shares([], 3) == []


def test_a_rerun_over_an_archive_of_another_key_scheme_is_refused(tmp_path, ray_local):
    write_files(tmp_path / "in", {"a.png": png(1)})
    archive = write_archive(tmp_path / "archive", ["a.png"], metadata={"corrdiff.key_scheme": "1"})
    with pytest.raises(ValueError, match="key scheme 1"):
        pending_images(list_images(SourceConfig(url=str(tmp_path / "in")), LOCAL), archive, LOCAL)


# Byte caps ----------------------------------------------------------------------------------


def test_an_object_over_the_cap_is_an_error_row_and_is_never_read(monkeypatch):
    reads: list[tuple[str, int]] = []
    original = MemoryFileSystem.cat_file

    def recording_cat_file(self, path, start=None, end=None, **kwargs):
        data = original(self, path, start=start, end=end, **kwargs)
        reads.append((path, len(data)))
        return data

    monkeypatch.setattr(MemoryFileSystem, "cat_file", recording_cat_file)
    fs = fsspec.filesystem("memory")
    big, small = noise_png(1), png(2)
    fs.pipe_file("/caps/big.png", big)
    fs.pipe_file("/caps/small.png", small)
    cap = len(big) - 1
    try:
        assert _fetch_one("memory:///caps/big.png", None, None, LOCAL, cap) == (None, too_large(len(big), cap))
        assert reads == []
        assert _fetch_one("memory:///caps/small.png", None, None, LOCAL, cap) == (small, None)
        # An object that grew after it was measured is still read no further than the cap.
        monkeypatch.setattr(MemoryFileSystem, "size", lambda self, path: 10)
        assert _fetch_one("memory:///caps/big.png", None, None, LOCAL, cap) == (None, too_large(cap + 1, cap))
        assert reads[-1] == ("/caps/big.png", cap + 1)
    finally:
        fs.rm("/caps", recursive=True)


def test_a_tar_member_over_the_cap_is_an_error_row_and_its_bytes_are_skipped(tmp_path, monkeypatch):
    big = noise_png(1)
    members = {"000000.png": png(0), "000001.png": big, "000001.json": b"{}", "000002.png": png(2)}
    (tmp_path / "s.tar").write_bytes(tar_bytes(members))
    extracted: list[str] = []
    original = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile",
                        lambda self, member: extracted.append(member.name) or original(self, member))
    cap = len(big) - 1
    source = SourceConfig(url=str(tmp_path), kind="tar", max_image_bytes=cap)
    skipped = Skipped()

    shard = str(tmp_path / "s.tar")
    rows = list(_tar_rows("s.tar", shard, shard, LOCAL_FS, source, LOCAL, frozenset(), skipped))

    assert [(key, data, error) for key, _, data, error in rows] == [
        ("s.tar/000000.png", png(0), None), ("s.tar/000001.png", None, too_large(len(big), cap)),
        ("s.tar/000002.png", png(2), None),
    ]
    assert extracted == ["000000.png", "000002.png"]
    assert skipped.report() == {"count": 1, "by_extension": {".json": {"count": 1, "examples": ["s.tar/000001.json"]}}}


def test_a_parquet_cell_over_the_cap_is_an_error_row(tmp_path):
    big = noise_png(1)
    (tmp_path / "a.parquet").write_bytes(parquet_bytes(["a", "b", "c"], [png(1), big, None]))
    cap = len(big) - 1
    source = SourceConfig(url=str(tmp_path), kind="parquet", key_column="id", image_column="bytes", max_image_bytes=cap)

    file = str(tmp_path / "a.parquet")
    tables = list(_parquet_tables("a.parquet", file, file, frozenset(), LOCAL_FS, source, LOCAL, 64))

    rows = {row["key"]: (row["data"], row["error"]) for table in tables for row in table.to_pylist()}
    assert rows == {"a": (png(1), None), "b": (None, too_large(len(big), cap)), "c": (None, "missing image bytes")}


def test_the_cap_must_be_positive():
    with pytest.raises(ValueError, match="max_image_bytes must be at least 1"):
        SourceConfig(url="/x", max_image_bytes=0)


# manifest ---------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["txt", "csv"])
def test_manifest_on_s3_with_a_missing_object(form, s3_server, ray_local):
    bucket = s3_server.make_bucket({"x/a.jpg": png(1), "y/b.png": png(2)})
    uris = [f"{bucket}/x/a.jpg", f"{bucket}/y/b.png", f"{bucket}/x/missing.jpg"]
    if form == "txt":
        manifest, keys = "# images to archive\n\n" + "\n".join(uris) + "\n", uris
    else:
        keys = ["0001", "0002", "0003"]  # leading zeros must survive: keys are text
        manifest = "key,uri,note\n" + "".join(f"{k},{u},n\n" for k, u in zip(keys, uris))
    s3_server.put(f"{bucket}/lists/manifest.{form}", manifest.encode())

    rows = collect(read_pending(SourceConfig(url=f"{bucket}/lists/manifest.{form}", kind="manifest"),
                                s3_server.storage, f"{bucket}/archive/"))

    assert sorted(rows) == sorted(keys)
    assert [rows[k]["source_uri"] for k in keys] == uris
    assert rows[keys[0]]["data"] == png(1) and rows[keys[1]]["data"] == png(2)
    assert rows[keys[2]]["data"] is None
    assert rows[keys[2]]["error"] == "read failed: not found"


@pytest.mark.parametrize(
    "manifest, error, message",
    [
        ("key,uri\na,/x/1.jpg\nb,/x/2.jpg\na,/x/3.jpg\n", DuplicateKeysError, "1 duplicate keys.*'a'"),
        ("uri\n/x/1.jpg\nrelative/2.jpg\n", ManifestError, "relative paths.*relative/2.jpg"),
        ("key,uri\na,/x/1.jpg\n,/x/2.jpg\n", ManifestError, "1 rows with an empty key or URI"),
        ("url\n/x/1.jpg\n", ManifestError, "no column 'uri'"),
        ("uri\n", ManifestError, "lists no URIs"),
    ],
)
def test_manifest_problems_are_refused_before_anything_is_read(tmp_path, manifest, error, message, ray_local):
    (tmp_path / "m.csv").write_text(manifest)
    source = SourceConfig(url=str(tmp_path / "m.csv"), kind="manifest")
    with pytest.raises(error, match=message):
        pending_images(list_images(source, LOCAL), str(tmp_path / "archive"), LOCAL)


# tar --------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "s3"])
def test_tar_shards_with_damage(where, tmp_path, s3_server, ray_local):
    samples = {f"{i:06d}.{ext}": png(i) for i, ext in enumerate(["jpg", "png", "jpg", "png"])}
    members = {name: data for image, data in samples.items()
               for name, data in ((image, data), (image.split(".")[0] + ".json", b'{"label": 1}'))}
    intact = tar_bytes(members)
    layout = tar_layout(intact)
    half = len(intact) // 2
    shards = {
        "train/shard-0.tar": intact,
        "train/shard-1.tar": intact[:half],  # cut inside a member
        "train/shard-2.tar": intact[: layout["000002.jpg"][0]],  # cut between members: tarfile is silent
        "train/shard-3.tar": b"this is not a tar file" * 30,
        "train/labels.txt": b"ignored",
    }
    if where == "local":
        write_files(tmp_path, shards)
        url, storage = str(tmp_path), LOCAL
    else:
        url, storage = s3_server.make_bucket(shards), s3_server.storage
    shard_0_done = "train/shard-0.tar/000003.png"

    rows = collect(read_listed_shards(SourceConfig(url=url, kind="tar"), storage, done_keys={shard_0_done},
                                      rows_per_block=3))

    intact_keys = {f"train/shard-0.tar/{name}" for name in samples} - {shard_0_done}
    cut_keys = {f"train/shard-1.tar/{name}" for name in samples if layout[name][1] <= half}
    assert 0 < len(cut_keys) < len(samples)
    damaged = {"train/shard-1.tar/#shard", "train/shard-2.tar/#shard", "train/shard-3.tar/#shard"}
    expected = intact_keys | cut_keys | damaged | {"train/shard-2.tar/000000.jpg", "train/shard-2.tar/000001.png"}
    assert set(rows) == expected
    for key in expected - damaged:
        shard, name = key.rsplit("/", 1)
        assert rows[key]["data"] == samples[name] and rows[key]["error"] is None
        assert rows[key]["source_uri"] == f"{url}/{shard}#{name}"
    for shard in ("shard-1", "shard-2", "shard-3"):
        row = rows[f"train/{shard}.tar/#shard"]
        assert row["data"] is None and row["error"].startswith("corrupt tar shard: ")
        assert row["source_uri"] == f"{url}/train/{shard}.tar"
    assert "end-of-archive" in rows["train/shard-2.tar/#shard"]["error"]
    # A rerun over everything archived: the damaged shards' rows are not written again.
    assert collect(read_listed_shards(SourceConfig(url=url, kind="tar"), storage,
                                      done_keys=set(rows) | {shard_0_done})) == {}


def test_tar_members_and_files_the_filter_skips_are_counted(tmp_path, ray_local):
    """Sidecars are met only by the tasks that read the shards; they are counted all the same."""
    write_files(tmp_path, {
        "a.tar": tar_bytes({"0.jpg": png(0), "0.json": b"{}", "0.cls": b"3"}),
        "b.tar": tar_bytes({"1.png": png(1), "1.json": b"{}"}),
        "README.md": b"# shards",
    })

    read = read_listed_shards(SourceConfig(url=str(tmp_path), kind="tar"), LOCAL)

    assert sorted(collect(read)) == ["a.tar/0.jpg", "b.tar/1.png"]
    assert read.skipped().report() == {"count": 4, "by_extension": {
        ".json": {"count": 2, "examples": ["a.tar/0.json", "b.tar/1.json"]},
        ".cls": {"count": 1, "examples": ["a.tar/0.cls"]},
        ".md": {"count": 1, "examples": ["README.md"]},
    }}


def test_tar_member_keys_show_where_the_shard_ends(tmp_path, ray_local):
    """a.tar holding b/x.png and a/b.tar holding x.png were both "a/b/x.png": one image lost
    to the other. The shard's ".tar" stays in the key; a resume skips exactly what is done."""
    write_files(tmp_path, {"a.tar": tar_bytes({"b/x.png": png(1)}), "a/b.tar": tar_bytes({"x.png": png(2)})})
    source = SourceConfig(url=str(tmp_path), kind="tar")

    rows = collect(read_listed_shards(source, LOCAL))

    assert {key: row["data"] for key, row in rows.items()} == {"a.tar/b/x.png": png(1), "a/b.tar/x.png": png(2)}
    assert rows["a/b.tar/x.png"]["source_uri"] == f"{tmp_path}/a/b.tar#x.png"
    assert sorted(collect(read_listed_shards(source, LOCAL, done_keys={"a.tar/b/x.png"}))) == ["a/b.tar/x.png"]


def test_shards_under_a_folder_named_like_a_shard_are_refused(tmp_path, ray_local):
    """x.tar/y.tar holding 0.png and x.tar holding y.tar/0.png would share a key again."""
    write_files(tmp_path, {"x.TAR/y.tar": tar_bytes({"0.png": png(0)}), "z.tar": tar_bytes({"0.png": png(0)})})
    with pytest.raises(ValueError, match=r"under a folder whose name ends in \.tar: 'x.TAR/y.tar'"):
        list_shards(SourceConfig(url=str(tmp_path), kind="tar"), LOCAL)


def test_names_with_double_colons_are_read_as_themselves(tmp_path, ray_local):
    """fsspec reads "a::b.png" in a URL as a chain ending in "a": the listing's own filesystem
    and path are what is read, so each file and shard gives its own bytes, not another's."""
    write_files(tmp_path, {
        "files/a::b.png": png(1), "files/a": png(2),
        "shards/s::1.tar": tar_bytes({"0.png": png(3)}), "shards/s": tar_bytes({"0.png": png(4)}),
    })

    files = collect(read_pending(SourceConfig(url=str(tmp_path / "files")), LOCAL, str(tmp_path / "archive")))
    shards = collect(read_listed_shards(SourceConfig(url=str(tmp_path / "shards"), kind="tar"), LOCAL))

    assert {key: (row["data"], row["error"]) for key, row in files.items()} == {"a::b.png": (png(1), None)}
    assert {key: (row["data"], row["error"]) for key, row in shards.items()} == {"s::1.tar/0.png": (png(3), None)}


@pytest.mark.parametrize("uri, key, expected", [
    ("/in/a.tar#b/x.png", "a.tar/b/x.png", ("/in/a.tar", "b/x.png")),
    ("/in/a.tar#b/x.png", "a/b/x.png", ("/in/a.tar", "b/x.png")),  # keys of archives before key scheme 2
    ("s3://b/x.tar#y/s.tar#c.tar#d.png", "x.tar#y/s.tar/c.tar#d.png", ("s3://b/x.tar#y/s.tar", "c.tar#d.png")),
    ("/in/S.TAR#x.png", "S.TAR/x.png", ("/in/S.TAR", "x.png")),
])
def test_a_tar_members_source_uri_is_split_where_its_key_says(uri, key, expected):
    assert split_tar_uri(uri, key) == expected


def test_a_source_uri_that_does_not_match_its_key_is_refused():
    with pytest.raises(ValueError, match="does not name a member"):
        split_tar_uri("/in/a.tar#x.png", "a.tar/y.png")
    assert split_parquet_uri("s3://b/t.parquet#k#1", "k#1") == "s3://b/t.parquet"
    with pytest.raises(ValueError, match="does not name the row"):
        split_parquet_uri("s3://b/t.parquet#k", "j")


class DroppingFile(AbstractBufferedFile):
    """Serves DroppingFileSystem.data in 1 KiB requests; the first request past the start fails."""

    def _fetch_range(self, start: int, end: int) -> bytes:
        if start > 0 and not DroppingFileSystem.dropped:
            DroppingFileSystem.dropped = True
            raise ConnectionResetError("connection reset by peer")
        return DroppingFileSystem.data[start:end]


class DroppingFileSystem(AbstractFileSystem):
    """One object whose connection drops once mid-stream, as object stores' connections do."""

    protocol = "dropping"
    data = b""
    dropped = False

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        return DroppingFile(self, path, mode, block_size=1024, size=len(self.data))

    def info(self, path, **kwargs):
        return {"name": path, "size": len(self.data), "type": "file"}


def test_a_connection_dropped_mid_shard_is_retried_in_place(monkeypatch):
    members = {f"{i:06d}.png": bytes([i]) * 30_000 for i in range(4)}  # larger than tarfile's reads
    monkeypatch.setattr(DroppingFileSystem, "data", tar_bytes(members))
    monkeypatch.setattr(DroppingFileSystem, "dropped", False)
    fsspec.register_implementation("dropping", DroppingFileSystem, clobber=True)

    source = SourceConfig(url="dropping://", kind="tar", extensions=(".png",))
    rows = list(_tar_rows("s.tar", "dropping://s.tar", "s.tar", DroppingFileSystem(), source, LOCAL, frozenset(),
                          Skipped()))

    assert DroppingFileSystem.dropped
    assert [(key, data, error) for key, _, data, error in rows] == [(f"s.tar/{n}", d, None) for n, d in members.items()]


# parquet ----------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "s3"])
def test_parquet_rows_with_a_null_image_a_corrupt_file_and_resume(where, tmp_path, s3_server, ray_local):
    images = {f"img-{i}": png(i) for i in range(5)}
    files = {
        "part/a.parquet": parquet_bytes(["img-0", "img-1", "img-2"], [images["img-0"], None, images["img-2"]],
                                        row_group_size=2),
        "b.parquet": parquet_bytes(["img-3", "img-4"], [images["img-3"], images["img-4"]]),
        "c.parquet": b"PAR1 but not really",
    }
    if where == "local":
        write_files(tmp_path, files)
        url, storage = str(tmp_path), LOCAL
    else:
        url, storage = s3_server.make_bucket(files), s3_server.storage
    source = SourceConfig(url=url, kind="parquet", key_column="id", image_column="bytes")

    assert list_shards(source, storage).items.column("key").to_pylist() == ["b.parquet", "c.parquet",
                                                                             "part/a.parquet"]
    rows = collect(read_listed_shards(source, storage, done_keys={"img-3"}))

    assert sorted(rows) == ["c/#file", "img-0", "img-1", "img-2", "img-4"]
    assert rows["img-1"]["data"] is None and rows["img-1"]["error"] == "missing image bytes"
    for key in ("img-0", "img-2", "img-4"):
        assert (rows[key]["data"], rows[key]["error"]) == (images[key], None)
    assert rows["img-0"]["source_uri"] == f"{url}/part/a.parquet#img-0"
    assert rows["c/#file"]["source_uri"] == f"{url}/c.parquet"
    assert rows["c/#file"]["data"] is None and rows["c/#file"]["error"].startswith("corrupt parquet file: ")
    # A rerun over everything archived: the damaged file's row is not written again.
    assert collect(read_listed_shards(source, storage, done_keys=set(rows) | {"img-3"})) == {}


def test_storage_that_stays_down_gives_a_retryable_error_row():
    """A store that refuses connections (a closed port) outlives the retries: the row says
    so as retryable (pipeline.errors), and a rerun will try it again; a missing object is final."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    storage = StorageConfig(endpoint_url=f"http://127.0.0.1:{closed}", key="k", secret="s", region="us-east-1",
                            retries=2, retry_wait=0.01)
    (_, error), = [_fetch_one("s3://bucket/photo.jpg", None, None, storage, max_bytes=1000)]
    assert error.startswith("read failed (retryable): ") and is_retryable(error)
    (_, error), = [_fetch_one("/nowhere/photo.jpg", None, None, LOCAL, max_bytes=1000)]
    assert error == "read failed: not found" and not is_retryable(error)


def test_parquet_missing_columns_are_refused_at_listing(tmp_path, ray_local):
    (tmp_path / "a.parquet").write_bytes(parquet_bytes(["a"], [b"x"]))
    with pytest.raises(ValueError, match="no column 'key', 'image'"):
        list_shards(SourceConfig(url=str(tmp_path), kind="parquet"), LOCAL)

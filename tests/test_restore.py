"""The restore command (pipeline.cli, as jobs/restore.py runs it) and the restore pipeline,
on archives written by the compress job."""

from __future__ import annotations

import io
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from corrdiff import CorrDiffCodec
from corrdiff.record import Record
from corrdiff.tiling import Tiling
from pipeline.cli import main as cli
from pipeline.compress import CodecSettings, CompressConfig, run_compress
from pipeline.keys import alternative_path, fold, key_to_path
from pipeline.resources import ResourceSettings
from pipeline.restore_archive import RestoreConfig, WritePngs, fold_aside, run_restore
from pipeline.sources import SourceConfig

from archives import EXAMPLES, photo_folder


def _compress(source: str, output: str, model: Path, **source_options) -> None:
    run_compress(CompressConfig(input=SourceConfig(url=source, **source_options), output=output,
                                codec=CodecSettings(model=str(model), device="cpu"),
                                resources=ResourceSettings(rows_per_file=4), max_pixels=300_000))


@pytest.fixture(scope="module")
def archive(ray_local, tiny_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("decode")
    photo_folder(root / "in")
    _compress(str(root / "in"), str(root / "archive"), tiny_model)
    return root / "archive"


def _rows(archive: Path) -> dict[str, dict]:
    return {r["key"]: r for r in pads.dataset(str(archive), format="parquet").to_table().to_pylist()}


def test_restores_every_key_bit_exactly(archive, tiny_model, tmp_path):
    out = tmp_path / "restored"
    summary = run_restore(RestoreConfig(archive=str(archive), output=str(out), device="cpu", run_id="all"))
    rows = _rows(archive)
    assert summary["rows"] == len(rows) == 10 and summary["restored"] == 6
    assert summary["statuses"] == {"compress_error": 4, "ok": 6}
    codec = CorrDiffCodec.from_pretrained(tiny_model, device="cpu")
    manifest = {r["key"]: r for r in pq.read_table(out / "_restore" / "all.parquet").to_pylist()}
    assert set(manifest) == set(rows)
    for key, row in rows.items():
        if row["error"] is not None:
            assert manifest[key]["status"] == "compress_error" and manifest[key]["error"] == row["error"]
            assert not (out / key_to_path(key)).exists()
            continue
        restored = np.asarray(Image.open(out / manifest[key]["path"]))
        assert manifest[key]["path"] == key_to_path(key)  # photos/x.jpg -> photos/x.jpg.png
        np.testing.assert_array_equal(restored, codec.decode([row["record"]])[0])  # found by model id
    assert (out / "_restore" / "all.json").exists()


def test_selected_keys_modes_and_keys_not_in_archive(archive, tmp_path):
    key = "photos/life.jpg"
    summary = run_restore(RestoreConfig(archive=str(archive), output=str(tmp_path / "out"), keys=(key, "nope.jpg"),
                                      mode="e2e", device="cpu", run_id="some"))
    assert summary["statuses"] == {"not_in_archive": 1, "ok": 1}
    assert [p.name for p in (tmp_path / "out" / "photos").iterdir()] == ["life.jpg.png"]
    e2e = np.asarray(Image.open(tmp_path / "out" / "photos" / "life.jpg.png"))
    full = run_restore(RestoreConfig(archive=str(archive), output=str(tmp_path / "full"), keys=(key,), device="cpu"))
    assert full["restored"] == 1
    assert not np.array_equal(e2e, np.asarray(Image.open(tmp_path / "full" / "photos" / "life.jpg.png")))


def test_unsafe_keys_stay_inside_the_output(ray_local, tiny_model, tmp_path):
    photos = sorted(EXAMPLES.glob("*.jpg"))[:3]
    keys = ["../../escaped.jpg", "/etc/passwd", "ok\x00\ncontrol"]
    (tmp_path / "table").mkdir()
    pq.write_table(pa.table({"key": keys, "image": [p.read_bytes() for p in photos]}), tmp_path / "table" / "t.parquet")
    _compress(str(tmp_path / "table"), str(tmp_path / "archive"), tiny_model, kind="parquet")
    out = tmp_path / "deep" / "out"
    summary = run_restore(RestoreConfig(archive=str(tmp_path / "archive"), output=str(out), device="cpu"))
    assert summary["restored"] == 3
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert written == sorted(key_to_path(k) for k in keys)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.png")) == [f"deep/out/{w}" for w in written]


def test_corrupt_record_and_missing_model_are_reported(archive, tmp_path):
    """A damaged record and one from a model nobody has: reported per key, the rest restored."""
    table = pads.dataset(str(archive), format="parquet").to_table()
    records = table["record"].to_pylist()
    ok = [i for i, r in enumerate(records) if r is not None]
    damaged = bytearray(records[ok[0]])
    damaged[len(damaged) // 2] ^= 0xFF
    foreign = bytearray(records[ok[1]])
    foreign[5:21] = bytes(16)  # another model id (the CRC is then recomputed to be valid)
    import zlib
    foreign[-4:] = zlib.crc32(bytes(foreign[:-4])).to_bytes(4, "little")
    records[ok[0]], records[ok[1]] = bytes(damaged), bytes(foreign)
    bad = tmp_path / "bad-archive"
    shutil.copytree(archive / "_models", bad / "_models")  # the damaged archive keeps its model
    pq.write_table(table.set_column(table.schema.get_field_index("record"), "record", pa.array(records, pa.binary())),
                   bad / "part-0.parquet")
    summary = run_restore(RestoreConfig(archive=str(bad), output=str(tmp_path / "out"), device="cpu", run_id="r"))
    assert summary["statuses"] == {"compress_error": 4, "corrupt": 1, "model_missing": 1, "ok": 4}
    manifest = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "_restore" / "r.parquet").to_pylist()}
    assert "checksum" in manifest[table["key"][ok[0]].as_py()]["error"]
    assert "00000000000000000000000000000000" in manifest[table["key"][ok[1]].as_py()]["error"]


def test_unknown_mode_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="unknown decode mode 'ee2e'"):
        RestoreConfig(archive=str(tmp_path / "missing"), output=str(tmp_path / "out"), mode="ee2e")


def test_job_cli_exit_codes(archive, tmp_path, capsys):
    assert cli(["restore", "--archive", str(archive), "--output", str(tmp_path / "a"), "--device", "cpu",
                            "--keys", "photos/life.jpg", "--mode", "e2e"]) == 0
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("photos/life.jpg\nbad/empty.png\n")
    assert cli(["restore", "--archive", str(archive), "--output", str(tmp_path / "b"), "--device", "cpu",
                            "--keys-file", str(keys_file), "--mode", "e2e"]) == 1
    assert '"compress_error": 1' in capsys.readouterr().out


def test_restore_from_s3_to_s3(s3_server, ray_local, tiny_model):
    photos = {p.name: p.read_bytes() for p in sorted(EXAMPLES.glob("*.jpg"))[:2]}  # key -> bytes
    bucket = s3_server.make_bucket({f"in/{key}": data for key, data in photos.items()})
    run_compress(CompressConfig(input=SourceConfig(url=f"{bucket}/in"), output=f"{bucket}/archive",
                                storage=s3_server.storage, codec=CodecSettings(model=str(tiny_model), device="cpu")))
    summary = run_restore(RestoreConfig(archive=f"{bucket}/archive", output=f"{bucket}/restored", mode="e2e",
                                      device="cpu", storage=s3_server.storage, run_id="s3"))
    assert summary["restored"] == 2 and summary["rows"] == 2
    name = bucket.removeprefix("s3://")
    keys = {o["Key"] for o in s3_server.client.list_objects_v2(Bucket=name, Prefix="restored/")["Contents"]}
    assert keys == {f"restored/{key}.png" for key in photos} | {"restored/_restore/s3.parquet",
                                                                "restored/_restore/s3.json"}
    for key, data in photos.items():
        body = s3_server.client.get_object(Bucket=name, Key=f"restored/{key}.png")["Body"].read()
        restored = Image.open(io.BytesIO(body))
        assert restored.format == "PNG" and restored.size == Image.open(io.BytesIO(data)).size


def test_a_damaged_file_is_named_for_the_keys_it_may_hold(archive, tmp_path):
    """A data file whose footer reads but whose key page fails its checksum: its keys are
    unknown, so an asked-for key that no readable file holds is ``unreadable_file`` with
    the file named (it may be there), never ``not_in_archive``; no ``#file`` key leaks out."""
    from archives import damage_a_page

    damaged = tmp_path / "damaged"
    shutil.copytree(archive, damaged)
    path = sorted(damaged.glob("part-*.parquet"))[0]
    held = pq.read_table(path, columns=["key"])["key"].to_pylist()
    damage_a_page(path, "key")
    summary = run_restore(RestoreConfig(archive=str(damaged), output=str(tmp_path / "out"), keys=(held[0], "nope.jpg"),
                                        device="cpu", run_id="r"))
    assert summary["statuses"] == {"unreadable_file": 3}  # the file, and each asked-for key
    manifest = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "_restore" / "r.parquet").to_pylist()}
    assert set(manifest) == {None, held[0], "nope.jpg"}
    assert manifest[None]["archive_file"].endswith(path.name) and "checksum" in manifest[None]["error"]
    for key in (held[0], "nope.jpg"):
        assert manifest[key]["status"] == "unreadable_file" and path.name in manifest[key]["error"]
        assert manifest[key]["archive_file"].endswith(path.name)


def test_a_few_keys_read_records_only_where_the_keys_are(archive, tmp_path):
    """restore --keys reads the records of a file only where an asked-for key is there: a
    file whose key range holds an absent key, its record pages damaged, is never read past
    its key column (were it, the checksum would fail and the key would be ``unreadable_file``)."""
    from archives import damage_a_page

    damaged = tmp_path / "damaged"
    shutil.copytree(archive, damaged)
    path = next(p for p in sorted(damaged.glob("part-*.parquet"))
                if pq.read_metadata(p).num_rows - pq.read_table(p, columns=["record"])["record"].null_count >= 2)
    held = sorted(pq.read_table(path, columns=["key"])["key"].to_pylist())
    damage_a_page(path, "record")
    absent = held[0] + "\x01"  # between two of its keys
    summary = run_restore(RestoreConfig(archive=str(damaged), output=str(tmp_path / "out"), keys=(absent,),
                                        device="cpu", run_id="r"))
    assert summary["statuses"] == {"not_in_archive": 1}


def _pngs(out: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(out)): np.asarray(Image.open(p)) for p in out.rglob("*.png")}


def test_keys_that_fold_together_or_clash_as_file_and_folder_each_keep_their_own_file(ray_local, tiny_model,
                                                                                      tmp_path):
    """Keys one case- or normalisation-insensitive file system (macOS, Windows) would give one
    name (``A.jpg``/``a.jpg``, NFC/NFD ``é``), and ``foo`` beside ``foo.png/bar``: every key's
    manifest path holds that key's pixels, and no two paths are one name, or a file and a
    folder, once folded, although this file system folds nothing. A rerun writes the same
    paths again and no others."""
    photos = sorted(EXAMPLES.glob("*.jpg"))
    keys = ["A.jpg", "a.jpg", unicodedata.normalize("NFC", "café.jpg"), unicodedata.normalize("NFD", "café.jpg"),
            "foo", "foo.png/bar"]
    (tmp_path / "table").mkdir()
    pq.write_table(pa.table({"key": keys, "image": [photos[i % len(photos)].read_bytes() for i in range(len(keys))]}),
                   tmp_path / "table" / "t.parquet")
    _compress(str(tmp_path / "table"), str(tmp_path / "archive"), tiny_model, kind="parquet")
    codec = CorrDiffCodec.from_pretrained(tiny_model, device="cpu")
    records = {k: codec.decode([r["record"]])[0] for k, r in _rows(tmp_path / "archive").items()}
    out = tmp_path / "out"
    paths = {}
    for run in ("first", "again"):
        summary = run_restore(RestoreConfig(archive=str(tmp_path / "archive"), output=str(out), device="cpu",
                                          run_id=run))
        assert summary["statuses"] == {"ok": len(keys)}
        manifest = {r["key"]: r["path"] for r in pq.read_table(out / "_restore" / f"{run}.parquet").to_pylist()}
        assert set(manifest) == set(keys)
        paths.setdefault("first", manifest)
        assert manifest == paths["first"]  # the rerun overwrote each key's own file
        for key, path in manifest.items():
            np.testing.assert_array_equal(np.asarray(Image.open(out / path)), records[key])
        folded = [fold(p) for p in manifest.values()]
        assert len(set(folded)) == len(keys)
        assert not any(b.startswith(a + "/") for a in folded for b in folded)
        assert sorted(_pngs(out)) == sorted(manifest.values())
    assert paths["first"]["A.jpg"] == "A.jpg.png" and paths["first"]["a.jpg"] == alternative_path("a.jpg")
    assert paths["first"]["foo"] == "foo.png" and paths["first"]["foo.png/bar"] == "foo.pn%67/bar.png"


def _folding_filesystem(root: Path):
    """A local file system that, below ``root``, compares names as macOS and Windows do: it
    stores every name folded (``keys.fold``), so ``A.jpg.png`` and ``a.jpg.png`` are one file."""
    from fsspec.implementations.local import LocalFileSystem

    class Folding(LocalFileSystem):
        cachable = False

        @classmethod
        def _strip_protocol(cls, path):
            path = super()._strip_protocol(path)
            inside = path.removeprefix(str(root))
            return str(root) + fold(inside) if inside != path else path

    return Folding()


def _batch(keys: list[str], pixels: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {"key": np.array(keys, dtype=object), "status": np.array(["ok"] * len(keys), dtype=object),
            "error": np.array([None] * len(keys), dtype=object), "pixels": pixels,
            "model_id": np.array(["m"] * len(keys), dtype=object), "codec": np.array(["corrdiff"] * len(keys), dtype=object),
            "archive_file": np.array(["f"] * len(keys), dtype=object), "archive_row": np.arange(len(keys)),
            "seconds": np.zeros(len(keys))}


def test_on_a_folding_file_system_no_key_replaces_another_keys_file(tmp_path, monkeypatch):
    """Write time, with no plan from the driver (keys from different runs): a file already at a
    key's name is read for the key it holds, not judged by its name. Another key's file, or a
    file without a key, is left as it is and the key goes to its alternative path; the same
    key's file (a rerun) is overwritten; with both names taken the key is ``write_failed``."""
    import pipeline.restore_archive

    from pipeline.storage import StorageConfig

    out = tmp_path / "out"
    fs = _folding_filesystem(out)
    monkeypatch.setattr(pipeline.restore_archive, "filesystem", lambda output, storage: (fs, str(out)))

    def restore(keys: list[str], seed: int) -> dict[str, dict]:
        pixels = [np.full((3, 2, 3), seed * 10 + i, np.uint8) for i in range(len(keys))]
        table = WritePngs(str(out), StorageConfig(), "corrdiff")(_batch(keys, pixels))
        return {r["key"]: r for r in table.to_pylist()}

    def pixels_at(path: str) -> int:
        with fs.open(str(out / path), "rb") as handle:
            return int(np.asarray(Image.open(handle))[0, 0, 0])

    nfc, nfd = unicodedata.normalize("NFC", "é.jpg"), unicodedata.normalize("NFD", "é.jpg")
    first = restore(["A.jpg", nfc], seed=1)
    assert [first[k]["path"] for k in ("A.jpg", nfc)] == ["A.jpg.png", key_to_path(nfc)]
    second = restore(["a.jpg", nfd], seed=2)  # each name is the other key's file here
    assert [second[k]["path"] for k in ("a.jpg", nfd)] == [alternative_path("a.jpg"), alternative_path(nfd)]
    assert (pixels_at("A.jpg.png"), pixels_at(key_to_path(nfc))) == (10, 11)  # untouched
    assert (pixels_at(second["a.jpg"]["path"]), pixels_at(second[nfd]["path"])) == (20, 21)
    again = restore(["a.jpg", "A.jpg"], seed=3)  # reruns: each overwrites its own file only
    assert [again[k]["path"] for k in ("a.jpg", "A.jpg")] == [alternative_path("a.jpg"), "A.jpg.png"]
    assert (pixels_at(alternative_path("a.jpg")), pixels_at("A.jpg.png")) == (30, 31)

    (out / "b.jpg.png").write_bytes(b"someone's file")  # no key: never replaced either
    assert restore(["b.jpg"], seed=4)["b.jpg"]["path"] == alternative_path("b.jpg")
    (out / fold(alternative_path("c.jpg"))).write_bytes(b"x")
    (out / "c.jpg.png").write_bytes(b"y")
    failed = restore(["c.jpg"], seed=5)["c.jpg"]
    assert failed["status"] == "write_failed" and failed["path"] is None and "nothing replaced" in failed["error"]
    assert (out / "b.jpg.png").read_bytes() == b"someone's file" and (out / "c.jpg.png").read_bytes() == b"y"


def test_fold_aside_keeps_one_key_of_each_folding_group_on_its_own_path():
    nfc, nfd = unicodedata.normalize("NFC", "é"), unicodedata.normalize("NFD", "é")
    assert fold_aside(["A.jpg", "a.jpg", "b.jpg", nfc, nfd, "x/Y", "X/y", "x/y"]) == {"a.jpg", nfc, "x/Y", "x/y"}


def test_an_object_without_the_key_is_never_replaced_on_s3(s3_server):
    """On S3 the same: an object at a key's name that does not hold that key stays, and the key
    goes to its alternative path; a rerun finds its own object and rewrites it."""
    bucket = s3_server.make_bucket({"out/b.jpg.png": b"someone's object"})
    pixels = [np.zeros((2, 2, 3), np.uint8)]
    for _ in range(2):
        [row] = WritePngs(f"{bucket}/out", s3_server.storage, "corrdiff")(_batch(["b.jpg"], pixels)).to_pylist()
        assert row["status"] == "ok" and row["path"] == alternative_path("b.jpg")
    name = bucket.removeprefix("s3://")
    assert s3_server.client.get_object(Bucket=name, Key="out/b.jpg.png")["Body"].read() == b"someone's object"
    body = s3_server.client.get_object(Bucket=name, Key=f"out/{alternative_path('b.jpg')}")["Body"].read()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(body))), pixels[0])


def test_a_restore_runs_with_the_encoders_thread_count_and_so_gets_its_pixels(ray_local, tiny_model, tmp_path):
    """oneDNN's float kernels can round otherwise at another thread count (docs/method.md,
    "Reproducible pixels"): the compress job records its actors' count in each file, and a
    restore whose actors run another one runs the records' networks with the recorded count,
    so it restores the encoder's pixels exactly, not merely to within a level. The records
    run their score tiles in batches of three, which every restore runs as the encoder did."""
    import torch

    from pipeline.archive import THREADS_KEY

    (tmp_path / "in").mkdir()
    for i, photo in enumerate(sorted(EXAMPLES.glob("*.jpg"))[:2]):
        shutil.copy(photo, tmp_path / "in" / f"{i}.jpg")
    archive, out = str(tmp_path / "archive"), tmp_path / "out"
    run_compress(CompressConfig(input=SourceConfig(url=str(tmp_path / "in")), output=archive,
                                codec=CodecSettings(model=str(tiny_model), device="cpu", tile=128, tile_overlap=32,
                                                    tile_batch=3),
                                resources=ResourceSettings(torch_threads=1)))
    assert {pq.read_metadata(p).metadata[THREADS_KEY.encode()] for p in Path(archive).glob("part-*.parquet")} == {b"1"}
    run_restore(RestoreConfig(archive=archive, output=str(out), device="cpu", run_id="other",
                              resources=ResourceSettings(torch_threads=2)))
    codec = CorrDiffCodec.from_pretrained(tiny_model, device="cpu")
    previous, differ = torch.get_num_threads(), 0
    try:
        for row in _rows(Path(archive)).values():
            assert Record.from_bytes(row["record"]).tiling == Tiling(128, 32, 3)
            torch.set_num_threads(1)
            [encoders] = codec.decode([row["record"]])
            torch.set_num_threads(2)
            differ += int(not np.array_equal(codec.decode([row["record"]])[0], encoders))
            np.testing.assert_array_equal(np.asarray(Image.open(out / key_to_path(row["key"]))), encoders)
    finally:
        torch.set_num_threads(previous)
    if not differ:
        pytest.skip("this CPU's kernels round the same at 1 and 2 threads: restored exactly, but nothing to tell apart")

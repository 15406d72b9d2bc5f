"""jobs/decode.py and the decode pipeline, on archives written by the compress job."""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from corrdiff import CorrDiffCodec
from pipeline.compress import CodecSettings, CompressConfig, run_compress
from pipeline.decode import DecodeConfig, run_decode
from pipeline.keys import key_to_path
from pipeline.resources import ResourceSettings
from pipeline.sources import SourceConfig

from archives import EXAMPLES, photo_folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "jobs"))

import decode as decode_job  # noqa: E402


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
    summary = run_decode(DecodeConfig(archive=str(archive), output=str(out), device="cpu", run_id="all"))
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
    summary = run_decode(DecodeConfig(archive=str(archive), output=str(tmp_path / "out"), keys=(key, "nope.jpg"),
                                      mode="e2e", device="cpu", run_id="some"))
    assert summary["statuses"] == {"not_in_archive": 1, "ok": 1}
    assert [p.name for p in (tmp_path / "out" / "photos").iterdir()] == ["life.jpg.png"]
    e2e = np.asarray(Image.open(tmp_path / "out" / "photos" / "life.jpg.png"))
    full = run_decode(DecodeConfig(archive=str(archive), output=str(tmp_path / "full"), keys=(key,), device="cpu"))
    assert full["restored"] == 1
    assert not np.array_equal(e2e, np.asarray(Image.open(tmp_path / "full" / "photos" / "life.jpg.png")))


def test_unsafe_keys_stay_inside_the_output(ray_local, tiny_model, tmp_path):
    photos = sorted(EXAMPLES.glob("*.jpg"))[:3]
    keys = ["../../escaped.jpg", "/etc/passwd", "ok\x00\ncontrol"]
    (tmp_path / "table").mkdir()
    pq.write_table(pa.table({"key": keys, "image": [p.read_bytes() for p in photos]}), tmp_path / "table" / "t.parquet")
    _compress(str(tmp_path / "table"), str(tmp_path / "archive"), tiny_model, kind="parquet")
    out = tmp_path / "deep" / "out"
    summary = run_decode(DecodeConfig(archive=str(tmp_path / "archive"), output=str(out), device="cpu"))
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
    summary = run_decode(DecodeConfig(archive=str(bad), output=str(tmp_path / "out"), device="cpu", run_id="r"))
    assert summary["statuses"] == {"compress_error": 4, "corrupt": 1, "model_missing": 1, "ok": 4}
    manifest = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "_restore" / "r.parquet").to_pylist()}
    assert "checksum" in manifest[table["key"][ok[0]].as_py()]["error"]
    assert "00000000000000000000000000000000" in manifest[table["key"][ok[1]].as_py()]["error"]


def test_unknown_mode_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="unknown decode mode 'ee2e'"):
        DecodeConfig(archive=str(tmp_path / "missing"), output=str(tmp_path / "out"), mode="ee2e")


def test_job_cli_exit_codes(archive, tmp_path, capsys):
    assert decode_job.main(["--archive", str(archive), "--output", str(tmp_path / "a"), "--device", "cpu",
                            "--keys", "photos/life.jpg", "--mode", "e2e"]) == 0
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("photos/life.jpg\nbad/empty.png\n")
    assert decode_job.main(["--archive", str(archive), "--output", str(tmp_path / "b"), "--device", "cpu",
                            "--keys-file", str(keys_file), "--mode", "e2e"]) == 1
    assert '"compress_error": 1' in capsys.readouterr().out


def test_restore_from_s3_to_s3(s3_server, ray_local, tiny_model):
    photos = {p.name: p.read_bytes() for p in sorted(EXAMPLES.glob("*.jpg"))[:2]}  # key -> bytes
    bucket = s3_server.make_bucket({f"in/{key}": data for key, data in photos.items()})
    run_compress(CompressConfig(input=SourceConfig(url=f"{bucket}/in"), output=f"{bucket}/archive",
                                storage=s3_server.storage, codec=CodecSettings(model=str(tiny_model), device="cpu")))
    summary = run_decode(DecodeConfig(archive=f"{bucket}/archive", output=f"{bucket}/restored", mode="e2e",
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
    summary = run_decode(DecodeConfig(archive=str(damaged), output=str(tmp_path / "out"), keys=(held[0], "nope.jpg"),
                                      device="cpu", run_id="r"))
    assert summary["statuses"] == {"unreadable_file": 3}  # the file, and each asked-for key
    manifest = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "_restore" / "r.parquet").to_pylist()}
    assert set(manifest) == {None, held[0], "nope.jpg"}
    assert manifest[None]["archive_file"].endswith(path.name) and "checksum" in manifest[None]["error"]
    for key in (held[0], "nope.jpg"):
        assert manifest[key]["status"] == "unreadable_file" and path.name in manifest[key]["error"]
        assert manifest[key]["archive_file"].endswith(path.name)

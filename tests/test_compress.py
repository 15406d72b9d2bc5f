"""The compress pipeline end to end on a real local Ray cluster, with real photos."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pillow_heif
import psutil
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from corrdiff import CorrDiffCodec, tiny_config
from corrdiff.metrics import lpips_backbone_path, psnr
from corrdiff.tiling import Tiling
from pipeline.archive import KEY_SCHEME, SCHEMA, file_metadata, list_data_files, read_columns
from pipeline.compress import CodecSettings, CompressConfig, run_compress
from pipeline.resources import ResourceSettings, model_worker_bytes, plan_resources
from pipeline.images import decode_image
from pipeline.sources import SourceConfig
from pipeline.storage import StorageConfig
from pipeline.summary_text import compress_summary_text

from archives import photo_folder as _photo_folder
from archives import write_tar_shard

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "photos"


def _config(source: str, output: str, model: Path, **kwargs) -> CompressConfig:
    return CompressConfig(
        input=SourceConfig(url=source, **kwargs.pop("input", {})), output=output,
        codec=CodecSettings(model=str(model), device="cpu"),
        resources=ResourceSettings(rows_per_file=kwargs.pop("rows_per_file", 4)),
        max_pixels=300_000, **kwargs,
    )


def _archive(url: str) -> "pa.Table":  # noqa: F821
    return pads.dataset(url, format="parquet").to_table()


def test_folder_to_archive_loses_nothing(ray_local, tiny_model, tmp_path):
    expected = _photo_folder(tmp_path / "in")
    summary = run_compress(_config(str(tmp_path / "in"), str(tmp_path / "archive"), tiny_model))

    table = _archive(str(tmp_path / "archive"))
    assert table.schema.remove_metadata() == SCHEMA.remove_metadata()
    rows = {r["key"]: r for r in table.to_pylist()}
    assert len(rows) == table.num_rows == len(expected)  # every key exactly once
    for key, error in expected.items():
        if error is None:
            assert rows[key]["error"] is None and rows[key]["record"] is not None
        else:
            assert rows[key]["error"].startswith(error) and rows[key]["record"] is None
    assert summary["rows"] == summary["unique_keys"] == len(expected)
    assert summary["ok"] == 6 and summary["errors"] == 4
    records = [r for r in rows.values() if r["error"] is None]  # the rate: all bits over all pixels
    assert summary["bpp"] == pytest.approx(8 * sum(r["record_bytes"] for r in records)
                                           / sum(r["width"] * r["height"] for r in records))
    assert summary["bpp_per_image"]["max"] == max(r["bpp"] for r in records) > summary["bpp"]  # the tiny images
    assert json.loads((tmp_path / "archive" / "_summary.json").read_text()) == summary


def test_the_formats_people_have_are_archived_and_skipped_files_reported(ray_local, tiny_model, tmp_path):
    """HEIC, JPEG XL, AVIF, GIF and the PNM family decode in the Ray workers (the plugins
    register where decode_image runs); what the extension filter leaves out is in the summary."""
    photo = Image.open(EXAMPLES / "sunset.jpg").convert("RGB").resize((48, 32))
    folder = tmp_path / "in"
    (folder / "raw").mkdir(parents=True)
    for name, fmt, options in [("a.heic", "HEIF", {"quality": 90}), ("b.jxl", "JXL", {}), ("c.avif", "AVIF", {}),
                               ("d.gif", "GIF", {}), ("e.ppm", "PPM", {}), ("f.pgm", "PPM", {})]:
        (photo.convert("L") if name.endswith(".pgm") else photo).save(folder / name, fmt, **options)
    pam = b"P7\nWIDTH 48\nHEIGHT 32\nDEPTH 4\nMAXVAL 255\nTUPLTYPE RGB_ALPHA\nENDHDR\n"
    (folder / "g.pam").write_bytes(pam + np.asarray(photo.convert("RGBA")).tobytes())
    for name in ("raw/1.CR2", "raw/2.CR2", "notes.txt"):
        (folder / name).write_bytes(b"not an image the filter takes")
    assert pillow_heif.is_supported((folder / "a.heic").read_bytes())

    summary = run_compress(_config(str(folder), str(tmp_path / "archive"), tiny_model))

    rows = {r["key"]: r for r in _archive(str(tmp_path / "archive")).to_pylist()}
    assert sorted(rows) == ["a.heic", "b.jxl", "c.avif", "d.gif", "e.ppm", "f.pgm", "g.pam"]
    assert {key: row["error"] for key, row in rows.items()} == dict.fromkeys(rows)
    assert all((row["width"], row["height"]) == (48, 32) for row in rows.values())
    assert summary["skipped_this_job"] == {"count": 3, "by_extension": {
        ".cr2": {"count": 2, "examples": ["raw/1.CR2", "raw/2.CR2"]},
        ".txt": {"count": 1, "examples": ["notes.txt"]},
    }}
    assert json.loads((tmp_path / "archive" / "_summary.json").read_text()) == summary
    printed = compress_summary_text(summary)
    assert ("skipped        3 files or tar members without an image extension: "
            ".cr2 2 (e.g. raw/1.CR2, raw/2.CR2); .txt 1 (e.g. notes.txt)") in printed.splitlines()


def test_archive_rows_are_honest(ray_local, tiny_model, tmp_path):
    """bpp, sizes, hashes and the encode-time PSNR all check out against the originals."""
    _photo_folder(tmp_path / "in", broken=False)
    run_compress(_config(str(tmp_path / "in"), str(tmp_path / "archive"), tiny_model))
    codec = CorrDiffCodec.from_pretrained(tiny_model, device="cpu")
    import hashlib

    for row in _archive(str(tmp_path / "archive")).to_pylist()[:3]:
        original = Path(row["source_uri"]).read_bytes()
        assert row["source_bytes"] == len(original)
        assert row["source_sha256"] == hashlib.sha256(original).hexdigest()
        assert row["record_bytes"] == len(row["record"])
        assert row["bpp"] == 8 * len(row["record"]) / (row["width"] * row["height"])
        assert row["model_id"] == codec.model_id_hex and row["steps"] == len(row["gammas"])
        assert row["codec"] == "corrdiff" and row["lpips"] is None and row["codec_setting"] is None  # no floor
        restored = codec.decode([row["record"]])[0]
        assert psnr(decode_image(original), restored) == row["psnr"]  # the decoder's exact pixels


@pytest.mark.skipif(not lpips_backbone_path("vgg").exists(), reason="LPIPS weights not installed (scripts/setup.sh)")
def test_perceptual_mode_refits_gammas_and_stays_exact(ray_local, tiny_model, tmp_path):
    """codec.gamma_refine_steps > 0 (here on LPIPS-vgg): other gammas than the closed form,
    the same latent, and records that still decode to exactly the pixels the archive row scored."""
    (tmp_path / "in").mkdir()
    for photo in sorted(EXAMPLES.glob("*.jpg"))[:2]:  # two photos: LPIPS-vgg refinement is slow on 2 cores
        shutil.copy(photo, tmp_path / "in" / photo.name)
    config = _config(str(tmp_path / "in"), str(tmp_path / "archive"), tiny_model)
    run_compress(replace(config, codec=replace(config.codec, gamma_refine_steps=3, gamma_metric="lpips-vgg")))
    codec = CorrDiffCodec.from_pretrained(tiny_model, device="cpu")
    rows = _archive(str(tmp_path / "archive")).to_pylist()
    assert len(rows) == 2
    moved = 0
    for row in rows:
        original = decode_image(Path(row["source_uri"]).read_bytes())
        assert psnr(original, codec.decode([row["record"]])[0]) == row["psnr"]
        closed_form = codec.parse(codec.encode([original])[0])
        refined = codec.parse(row["record"])
        assert (refined.y_strings, refined.z_string) == (closed_form.y_strings, closed_form.z_string)
        moved += not np.array_equal(refined.gammas, closed_form.gammas)
    assert moved > 0
    [first, *_] = list_data_files(str(tmp_path / "archive"), StorageConfig())
    settings = json.loads(file_metadata(first, StorageConfig())["corrdiff.config"])["codec"]
    assert (settings["gamma_refine_steps"], settings["gamma_metric"]) == (3, "lpips-vgg")


def test_bad_gamma_refinement_settings_are_refused():
    with pytest.raises(ValueError, match="gamma_refine_steps must be >= 0"):
        CodecSettings(gamma_refine_steps=-1)
    with pytest.raises(ValueError, match="gamma_learning_rate > 0"):
        CodecSettings(gamma_learning_rate=0.0)
    with pytest.raises(ValueError, match="gamma_metric 'ssim' is not one of lpips-alex, lpips-vgg, dists"):
        CodecSettings(gamma_metric="ssim")
    with pytest.raises(ValueError, match="invalid tile side 100"):
        CodecSettings(tile=100)
    with pytest.raises(ValueError, match="invalid tile overlap 48"):
        CodecSettings(tile=64, tile_overlap=48)
    with pytest.raises(ValueError, match="invalid tile batch 17: from 1 to 16 tiles of 512 px"):
        CodecSettings(tile_batch=17)


def test_file_metadata_names_model_and_config(ray_local, tiny_model, tmp_path):
    _photo_folder(tmp_path / "in", broken=False)
    run_compress(_config(str(tmp_path / "in"), str(tmp_path / "archive"), tiny_model, job_id="job-7"))
    [first, *_] = list_data_files(str(tmp_path / "archive"), StorageConfig())
    metadata = file_metadata(first, StorageConfig())
    assert metadata["corrdiff.archive_schema"] == "2" and metadata["corrdiff.job_id"] == "job-7"
    assert metadata["corrdiff.model_id"] == CorrDiffCodec.from_pretrained(tiny_model, device="cpu").model_id_hex
    assert json.loads(metadata["corrdiff.config"])["input"]["url"] == str(tmp_path / "in")


def test_rerun_after_a_crash_writes_only_the_missing_keys(ray_local, tiny_model, tmp_path):
    expected = _photo_folder(tmp_path / "in")
    archive = tmp_path / "archive"
    # A first run saw part of the input, then died while writing a file.
    partial = tmp_path / "partial"
    shutil.copytree(tmp_path / "in", partial)
    for key in list(expected)[3:]:
        (partial / key).unlink()
    run_compress(_config(str(partial), str(archive), tiny_model, job_id="first"))
    (archive / ".tmp-part-first-00009-deadbeef.parquet").write_bytes(b"PAR1 half a file")

    summary = run_compress(_config(str(tmp_path / "in"), str(archive), tiny_model, job_id="second"))

    table = _archive(str(archive))
    jobs = dict(zip(table.column("key").to_pylist(), table.column("job_id").to_pylist()))
    assert sorted(jobs) == sorted(expected) and table.num_rows == len(expected)
    assert [jobs[k] for k in list(expected)[:3]] == ["first"] * 3
    assert all(jobs[k] == "second" for k in list(expected)[3:])
    assert not list(archive.glob(".tmp-*"))
    assert summary["processed_this_job"] == len(expected) - 3


def test_an_image_that_kills_its_worker_is_an_error_row_and_a_rerun_retries_it(ray_local, tiny_model, tmp_path):
    """A 2.25 Mpx image coded in one tile needs ~1.6 GB more than the worker's model (tiny model, measured),
    over a 1.4 GiB memory cap; the photos need ~0.25 GB. The huge image's worker is killed
    at the cap each time it is tried; it becomes a retryable error row, and every photo
    around it is archived (before pipeline.isolation, Ray restarted the actor and retried
    the batch forever). A rerun with a higher cap archives it, and its error row is gone.

    The bomb, a 36 Mpx PNG of one colour (120 KB, under the pixel limit), needs ~0.5 GB to
    decode, over the decoding child's 0.3 GiB cap: it kills its decoder every time, in
    both runs, and stays one retryable error row. It stands for a bomb that defeats the
    pixel limit: before pipeline.image_decoder, such an image killed the decode task's
    worker, and the job failed."""
    expected = _photo_folder(tmp_path / "in", broken=False)
    noise = np.random.default_rng(0).integers(0, 256, (1500, 1500, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "in" / "huge.png")
    Image.new("RGB", (6000, 6000), (9, 9, 9)).save(tmp_path / "in" / "bomb.png")
    # One tile as large as the image: a 512 px tile bounds the memory of any image (that is
    # what tiles are for), so the test codes the huge image whole to have it cross the cap.
    config = replace(_config(str(tmp_path / "in"), str(tmp_path / "archive"), tiny_model),
                     codec=CodecSettings(model=str(tiny_model), device="cpu", tile=1536),
                     resources=ResourceSettings(rows_per_file=4, worker_memory_gb=1.4, image_worker_memory_gb=0.3),
                     max_pixels=40_000_000)
    summary = run_compress(config)
    rows = {r["key"]: r for r in _archive(str(tmp_path / "archive")).to_pylist()}
    assert sorted(rows) == sorted([*expected, "huge.png", "bomb.png"])
    assert rows["huge.png"]["error"] == \
        "worker died (retryable): it crossed its memory cap of 1.4 GiB (tried 2 time(s) alone)"
    assert rows["huge.png"]["record"] is None and rows["huge.png"]["source_sha256"] is not None
    assert rows["bomb.png"]["error"] == \
        "decode crashed (retryable): it crossed its memory cap of 0.3 GiB (tried 2 time(s) alone)"
    assert rows["bomb.png"]["record"] is None and rows["bomb.png"]["source_sha256"] is not None
    assert all(rows[key]["record"] is not None for key in expected)
    assert summary["error_reasons"] == {"worker died (retryable)": 1, "decode crashed (retryable)": 1}
    assert summary["retryable_errors"] == 2

    rerun = run_compress(replace(config, resources=replace(config.resources, worker_memory_gb=None)))
    rows = _archive(str(tmp_path / "archive")).to_pylist()
    assert sorted(r["key"] for r in rows) == sorted([*expected, "huge.png", "bomb.png"])  # one row per key
    by_key = {r["key"]: r for r in rows}
    assert by_key["huge.png"]["record"] is not None and by_key["bomb.png"]["error"].startswith("decode crashed")
    assert rerun["processed_this_job"] == 2 and rerun["superseded_retryable_rows"] == 2
    assert rerun["errors"] == rerun["retryable_errors"] == 1


def test_a_run_that_loses_its_encode_actor_resumes_itself(ray_local, tiny_model, tmp_path):
    """The encode actor is killed from outside, as a lost node takes it, while it starts (its
    model process is still loading). Ray Data then fails the run (an actor that dies while it
    encodes, it sometimes replaces by itself), and the run resumes from the archive."""
    expected = _photo_folder(tmp_path / "in")
    archive = tmp_path / "archive"
    config = _config(str(tmp_path / "in"), str(archive), tiny_model)
    files_at_kill: list[int] = []

    def kill_the_starting_actor() -> None:
        deadline = time.time() + 240
        while time.time() < deadline:
            for process in _descendants(psutil.Process()):  # this cluster's, not another's on the machine
                if _is_model_process(process) and _is_encode_actor(process.parent()):
                    process.parent().kill()  # not a decode task's: those run a decoding child too
                    files_at_kill.append(len(list(archive.glob("part-*.parquet"))))
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_the_starting_actor)
    killer.start()
    summary = run_compress(config)
    killer.join()
    keys = _archive(str(archive)).column("key").to_pylist()
    assert files_at_kill == [0] and summary["resumed_after_lost_workers"] == 1
    assert sorted(keys) == sorted(expected)


def _descendants(process: psutil.Process) -> list[psutil.Process]:
    """The processes under ``process``: the Ray cluster it started (raylet, workers, their
    children), and nothing of another cluster that other test runs keep on this machine."""
    try:
        return process.children(recursive=True)
    except psutil.Error:
        return []


def _is_model_process(process: psutil.Process) -> bool:
    """Whether ``process`` is a stage's child process (pipeline.isolation)."""
    try:
        return "pipeline.isolation" in process.cmdline()
    except psutil.Error:
        return False


def _is_encode_actor(process: psutil.Process | None) -> bool:
    """Whether ``process`` is an encode actor (Ray titles it after its stage)."""
    try:
        return process is not None and "EncodeImages" in " ".join(process.cmdline())
    except psutil.Error:
        return False


def test_plan_never_starves_the_readers():
    plan = plan_resources(ResourceSettings(), {"CPU": 2.0})
    assert plan.actors == 1 and plan.actor.num_cpus <= 1.0 and plan.torch_threads == 2
    big = plan_resources(ResourceSettings(), {"CPU": 16.0})
    assert big.actors * big.actor.num_cpus <= 15.0 and big.actors == 3
    gpu = plan_resources(ResourceSettings(), {"CPU": 16.0, "GPU": 2.0})
    assert gpu.actors == 4 and gpu.actor.num_gpus == 0.5


def test_plan_runs_no_more_actors_than_the_memory_holds():
    """Each encode actor may hold the largest admitted image's state and its batch: the pool
    is cut to what Ray's memory holds, never below one actor, unless the settings fix it."""
    from corrdiff.memory import coding_bytes

    config = tiny_config()
    small = model_worker_bytes(10**6, coding_bytes(config, Tiling(), 10**6), 4, 10**6)
    large = model_worker_bytes(10**6, coding_bytes(config, Tiling(), 10**8), 4, 10**8)
    assert large - small > 10**8 * 42  # the sampler's whole-image state, at 42 bytes a pixel
    cluster = {"CPU": 16.0, "memory": 2.5 * large}
    assert plan_resources(ResourceSettings(), cluster, small).actors == 3  # as many as the CPUs allow
    assert plan_resources(ResourceSettings(), cluster, large).actors == 2
    assert plan_resources(ResourceSettings(), {"CPU": 16.0, "memory": large / 2}, large).actors == 1
    assert plan_resources(ResourceSettings(actors=3), {"CPU": 16.0, "memory": large / 2}, large).actors == 3


def test_s3_input_and_output(ray_local, s3_server, tiny_model):
    photos = {f"in/{p.name}": p.read_bytes() for p in sorted(EXAMPLES.glob("*.jpg"))[:3]}
    photos["in/broken.jpg"] = b"\xff\xd8\xff\xe0 truncated jpeg"
    bucket = s3_server.make_bucket(photos)
    config = CompressConfig(
        input=SourceConfig(url=f"{bucket}/in"), output=f"{bucket}/archive", storage=s3_server.storage,
        codec=CodecSettings(model=str(tiny_model), device="cpu"), resources=ResourceSettings(rows_per_file=2),
    )
    summary = run_compress(config)
    assert summary["rows"] == summary["unique_keys"] == 4 and summary["ok"] == 3 and summary["errors"] == 1
    listed = s3_server.client.list_objects_v2(Bucket=bucket.removeprefix("s3://"), Prefix="archive/")
    names = [o["Key"] for o in listed["Contents"]]
    assert "archive/_summary.json" in names and any(n.endswith(".parquet") for n in names)
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server.storage.fsspec_options(bucket))
    table = pads.dataset(f"{bucket.removeprefix('s3://')}/archive", format="parquet", filesystem=fs).to_table()
    rows = {r["key"]: r for r in table.to_pylist()}
    assert rows["broken.jpg"]["error"] is not None
    assert rows["sunset.jpg" if "sunset.jpg" in rows else sorted(rows)[0]]["source_uri"].startswith(bucket)


def test_tar_shards(ray_local, tiny_model, tmp_path):
    photos = sorted(EXAMPLES.glob("*.jpg"))
    (tmp_path / "shards").mkdir()
    write_tar_shard(tmp_path / "shards" / "000000.tar", {
        "000000.jpg": photos[0].read_bytes(), "000000.json": b"{}", "000001.jpg": photos[1].read_bytes(),
    })
    write_tar_shard(tmp_path / "shards" / "000001.tar", {"000002.jpg": photos[2].read_bytes(), "000003.jpg": b"garbage"})
    summary = run_compress(_config(str(tmp_path / "shards"), str(tmp_path / "archive"), tiny_model,
                                   input={"kind": "tar"}))
    keys = sorted(_archive(str(tmp_path / "archive")).column("key").to_pylist())
    assert keys == ["000000.tar/000000.jpg", "000000.tar/000001.jpg", "000001.tar/000002.jpg", "000001.tar/000003.jpg"]
    assert summary["ok"] == 3 and summary["errors"] == 1
    assert summary["skipped_this_job"] == {"count": 1, "by_extension": {
        ".json": {"count": 1, "examples": ["000000.tar/000000.json"]}}}
    assert {file_metadata(path, StorageConfig())["corrdiff.key_scheme"]
            for path in list_data_files(str(tmp_path / "archive"), StorageConfig())} == {KEY_SCHEME}
    # Both shards are finished (a member that is not an image is a final error row): marked.
    assert summary["shards"] == {"finished_before": 0, "read": 2, "finished_this_run": 2}
    markers = [json.loads(m.read_text()) for m in (tmp_path / "archive" / "_shards").iterdir()]
    assert sorted((m["shard"], m["rows"]) for m in markers) == [("000000.tar", 2), ("000001.tar", 2)]

    # A rerun reads only what is not finished: a new shard, never the finished ones. To
    # show it, 000000.tar is overwritten with zeros of the same size and time: read, it
    # would give a '#shard' error row.
    shard = tmp_path / "shards" / "000000.tar"
    stat = shard.stat()
    shard.write_bytes(bytes(stat.st_size))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    write_tar_shard(tmp_path / "shards" / "000002.tar", {"000004.jpg": photos[3].read_bytes()})
    summary = run_compress(_config(str(tmp_path / "shards"), str(tmp_path / "archive"), tiny_model,
                                   input={"kind": "tar"}, job_id="rerun"))
    assert summary["shards"] == {"finished_before": 2, "read": 1, "finished_this_run": 1}
    assert sorted(_archive(str(tmp_path / "archive")).column("key").to_pylist()) == [*keys, "000002.tar/000004.jpg"]
    # Every shard finished: a rerun starts no pipeline at all.
    summary = run_compress(_config(str(tmp_path / "shards"), str(tmp_path / "archive"), tiny_model,
                                   input={"kind": "tar"}, job_id="third"))
    assert summary["shards"] == {"finished_before": 3, "read": 0, "finished_this_run": 0}
    assert summary["rows"] == 5 and summary["processed_this_job"] == 0


@pytest.mark.parametrize("kind, scheme, refused", [
    ("tar", None, True), ("tar", KEY_SCHEME, False), ("files", None, False), ("files", "3", True),
])
def test_a_resume_over_keys_of_another_scheme_is_refused(tmp_path, kind, scheme, refused):
    """An archive of tar shards written before key scheme 2 keys members "<shard without
    .tar>/<member>": resuming it now would archive every member again under a new key."""
    from datetime import datetime, timezone

    from pipeline.archive import data_file_bytes, done_keys, job_metadata

    metadata = job_metadata("tiny", "0" * 32, {"input": {"url": "/in", "kind": kind}}, "old") | (
        {"corrdiff.key_scheme": scheme} if scheme else {})
    row = {"key": "shard/0.jpg", "source_uri": "/in/shard.tar#0.jpg", "created_at": datetime.now(timezone.utc),
           "job_id": "old"}
    (tmp_path / "archive").mkdir()
    (tmp_path / "archive" / "part-old.parquet").write_bytes(
        data_file_bytes(pa.Table.from_pylist([row], schema=SCHEMA).replace_schema_metadata(metadata)))
    if refused:
        with pytest.raises(ValueError, match="key scheme"):
            done_keys(str(tmp_path / "archive"), StorageConfig())
    else:
        assert done_keys(str(tmp_path / "archive"), StorageConfig()) == {"shard/0.jpg"}


def test_parquet_input(ray_local, tiny_model, tmp_path):
    import pyarrow as pa

    photos = sorted(EXAMPLES.glob("*.jpg"))[:3]
    (tmp_path / "table").mkdir()
    pq.write_table(pa.table({
        "id": [p.stem for p in photos] + ["missing"],
        "jpeg": [p.read_bytes() for p in photos] + [None],
    }), tmp_path / "table" / "images.parquet")
    summary = run_compress(_config(str(tmp_path / "table"), str(tmp_path / "archive"), tiny_model,
                                   input={"kind": "parquet", "key_column": "id", "image_column": "jpeg"}))
    rows = {r["key"]: r for r in _archive(str(tmp_path / "archive")).to_pylist()}
    assert sorted(rows) == sorted([p.stem for p in photos] + ["missing"])
    assert rows["missing"]["error"] == "missing image bytes" and summary["ok"] == 3
    assert summary["shards"] == {"finished_before": 0, "read": 1, "finished_this_run": 1}


@pytest.mark.slow  # runs the job in processes of its own, each with its own Ray cluster
@pytest.mark.parametrize("store,seed", [("local", 0), ("s3", 1)])
def test_killed_job_resumes_without_loss_or_duplicates(store, seed, tiny_model, tmp_path, request):
    """Fault injection on a real job: at seeded random moments while it encodes, its model
    worker process is killed (as the out-of-memory killer would), then the whole job (driver
    and its local cluster) gets kill -9; then the same command again. Every key is in the
    archive once, and the worker's death cost no image."""
    rng = np.random.default_rng(seed)
    expected = list(_photo_folder(tmp_path / "in"))
    for i, image in enumerate(rng.integers(0, 256, (2, 1000, 1000, 3), dtype=np.uint8)):  # slow to encode
        Image.fromarray(image).save(tmp_path / "in" / f"noise-{i}.png")
        expected.append(f"noise-{i}.png")
    settings = "resources: {rows_per_file: 1, actor_batch_size: 1, task_batch_size: 1}\nmax_pixels: 1000000\n"
    if store == "s3":
        s3 = request.getfixturevalue("s3_server")
        bucket = s3.make_bucket({f"in/{p.relative_to(tmp_path / 'in')}": p.read_bytes()
                                 for p in (tmp_path / "in").rglob("*") if p.is_file()})
        source, archive, storage = f"{bucket}/in", f"{bucket}/archive", s3.storage
        settings += "storage: " + json.dumps({"endpoint_url": s3.storage.endpoint_url, "region": s3.storage.region,
                                              "retry_wait": 0.05}) + "\n"
    else:
        source, archive, storage = str(tmp_path / "in"), str(tmp_path / "archive"), StorageConfig()
    config = tmp_path / "one-row-files.yaml"
    config.write_text(settings)
    command = [sys.executable, str(ROOT / "jobs" / "compress.py"), "--input", source, "--output", archive,
               "--model", str(tiny_model), "--device", "cpu", "--config", str(config)]
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    worker_after, job_after = rng.uniform(4, 8), rng.uniform(2, 5)  # seconds into encoding; then after that
    deadline, worker_started, killed = time.time() + 300, None, []
    def encode_workers() -> list[psutil.Process]:  # the encode actor's model process, not a decode task's child
        return [p for p in _descendants(psutil.Process(job.pid)) if _is_model_process(p) and _is_encode_actor(p.parent())]

    while time.time() < deadline and job.poll() is None and len(killed) < 2:
        if worker_started is None:
            if encode_workers():
                worker_started = time.time()
        elif not killed and time.time() > worker_started + worker_after:
            workers = encode_workers()
            if not workers:
                continue
            workers[0].kill()
            killed.append(("worker", time.time()))
        elif killed and time.time() > killed[0][1] + job_after:
            os.killpg(job.pid, signal.SIGKILL)
            killed.append(("job", len(read_columns(archive, storage, ["key"]))))
        time.sleep(0.05)
    job.wait()
    assert [what for what, _ in killed] == ["worker", "job"] and killed[-1][1] < len(expected), \
        f"the kills did not land mid-run: {killed}"
    rerun = subprocess.run(command, check=True, capture_output=True, text=True, timeout=400)
    rows = read_columns(archive, storage, ["key", "error"]).to_pylist()
    assert sorted(row["key"] for row in rows) == sorted(expected), f"kills at {killed}"
    assert not [row for row in rows if (row["error"] or "").startswith("worker died")]
    # What an operator reads in the job's log: the summary, no known-harmless warnings, and
    # no per-operator progress lines (stdout is not a terminal here).
    output = rerun.stdout + rerun.stderr
    assert "images         " in rerun.stdout and "FutureWarning" not in output
    assert "Queued blocks" not in output and "Execution plan" not in output
    # No error-level line from Ray: its core worker logged one for every restartable actor
    # pool whose constructor arguments are in the object store (ray-project/ray#57733).
    assert "max_restarts" not in output and "core_worker.cc" not in output

"""The archive summary from the files' footer summaries: it adds up to what the rows say,
old files without one included, and it never reads a record."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem

import pipeline.archive as archive_module
from pipeline.archive import SCHEMA, data_file_bytes, list_data_files, read_columns
from pipeline.errors import is_retryable, retryable
from pipeline.file_summary import (BINS_PER_OCTAVE, MAX_REASONS, SUMMARY_KEY, SUMMARY_VERSION, BppHistogram,
                                   FileSummary, error_reason)
from pipeline.skipped import Skipped
from pipeline.storage import StorageConfig
from pipeline.summary import TOP_REASONS, summarize
from pipeline.supersede import supersede_retried

STORAGE = StorageConfig()
EARLY = datetime(2026, 1, 1, tzinfo=timezone.utc)
LOST = retryable("read failed", "ConnectionError: reset by peer")
RECORD_BYTES_BIG = 16_384  # records much larger than a footer, so that reading one would show


def _record(key: str, width: int, height: int, size: int, job: str, codec: str = "corrdiff",
            model: str | None = "m1", created: datetime = EARLY, seed: int = 0) -> dict:
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()  # incompressible
    return {"key": key, "source_uri": f"/in/{key}", "source_bytes": 3 * size + 7, "width": width, "height": height,
            "record": data, "codec": codec, "record_bytes": size, "bpp": 8 * size / (width * height),
            "model_id": model if codec == "corrdiff" else None, "created_at": created, "job_id": job}


def _error(key: str, error: str, job: str, created: datetime = EARLY) -> dict:
    return {"key": key, "source_uri": f"/in/{key}", "source_bytes": 11, "error": error, "created_at": created,
            "job_id": job}


def _write(archive: Path, name: str, rows: list[dict], job: str) -> Path:
    archive.mkdir(exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=SCHEMA).replace_schema_metadata({"corrdiff.job_id": job})
    path = archive / name
    path.write_bytes(data_file_bytes(table))
    return path


def _write_old(archive: Path, name: str, rows: list[dict]) -> Path:
    """A file as written before footer summaries, of schema version 1 (no codec column), one row group."""
    archive.mkdir(exist_ok=True)
    v1 = pa.schema([f for f in SCHEMA if f.name not in ("codec", "codec_setting", "lpips")])
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "codec"} for r in rows], schema=v1)
    path = archive / name
    pq.write_table(table.replace_schema_metadata({"corrdiff.archive_schema": "1"}), path)
    assert SUMMARY_KEY.encode() not in (pq.read_metadata(path).metadata or {})
    return path


def _collection(archive: Path) -> None:
    """Three jobs' files: records of several sizes, models and codecs, final and retryable
    errors (one of them retried by the third job), reasons without detail, and an old file."""
    first = [_record(f"a/{i:03d}", 16 + 8 * (i % 7), 16 + 4 * (i % 5), 40 + 37 * i, "first", seed=i) for i in range(70)]
    first += [_record("a/tiny", 1, 1, 130, "first"), _record("a/fallback", 32, 32, 900, "first", codec="avif")]
    first += [_error("a/text", "not a recognised image format: cannot identify", "first"),
              _error("a/big", "image too large: 700x500", "first"), _error("a/lost", LOST, "first"),
              _error("a/odd", "an error text without a colon", "first")]
    _write(archive, "part-first-1.parquet", first, "first")
    second = [_record(f"b/{i:03d}", 64, 48, 200 + 11 * i, "second", model="m2", seed=100 + i) for i in range(10)]
    second += [_error("b/lost", retryable("worker died", "killed by SIGKILL"), "second"),
               _error("b/trunc", "corrupt or truncated image: broken data stream", "second")]
    _write(archive, "part-second-1.parquet", second, "second")
    _write(archive, "part-third-1.parquet", [_record("a/lost", 40, 30, 333, "third", created=EARLY + timedelta(hours=1),
                                                     model="m2", seed=7)], "third")
    _write_old(archive, "part-old-1.parquet", [_record(f"o/{i}", 20, 20, 50 + i, "old", seed=200 + i) for i in range(5)]
               + [_error("o/bad", "empty file: 0 bytes", "old")])


def _row_by_row(archive: Path, job_id: str) -> dict:
    """The summary's figures computed from every row, as the summary did before footers."""
    table = read_columns(str(archive), STORAGE, ["key", "error", "source_bytes", "bpp", "record_bytes", "width",
                                                 "height", "model_id", "codec", "job_id"])
    errors = [e for e in table["error"].to_pylist() if e is not None]
    records = table.filter(pc.is_null(table["error"]))
    pixels = pc.sum(pc.multiply(records["width"].cast(pa.int64()), records["height"].cast(pa.int64()))).as_py()
    p5, p50, p95 = pc.quantile(records["bpp"], q=[0.05, 0.5, 0.95], interpolation="nearest").to_pylist()
    ranked = sorted(Counter(e.split(":", 1)[0] for e in errors).items(), key=lambda item: (-item[1], item[0]))
    codecs = Counter(c for c in table["codec"].to_pylist() if c is not None)
    return {
        "rows": table.num_rows, "unique_keys": pc.count_distinct(table["key"]).as_py(),
        "ok": records.num_rows, "errors": len(errors), "retryable_errors": sum(map(is_retryable, errors)),
        "error_reasons": dict(ranked[:TOP_REASONS]), "input_bytes": pc.sum(table["source_bytes"]).as_py(),
        "archive_bytes": sum(Path(p).stat().st_size for p in list_data_files(str(archive), STORAGE)),
        "bpp": 8 * pc.sum(records["record_bytes"]).as_py() / pixels,
        "bpp_per_image": {"p5": p5, "median": p50, "p95": p95, "max": pc.max(records["bpp"]).as_py()},
        "codecs": dict(sorted(codecs.items())),
        "models": Counter(m for m in table["model_id"].to_pylist() if m),
        "processed_this_job": int(pc.sum(pc.equal(table["job_id"], job_id)).as_py()),
    }


def _assert_adds_up(summary: dict, expected: dict, keys: bool = True) -> None:
    for name in ("rows", "ok", "errors", "retryable_errors", "error_reasons", "input_bytes", "archive_bytes", "codecs",
                 "processed_this_job") + (("unique_keys",) if keys else ()):
        assert summary[name] == expected[name], name
    assert summary["bpp"] == pytest.approx(expected["bpp"], rel=1e-12)  # pixel-weighted: exact sums
    assert {m: v["records"] for m, v in summary["models"].items()} == expected["models"]
    assert summary["bpp_per_image"]["max"] == expected["bpp_per_image"]["max"]  # exact
    for name in ("p5", "median", "p95"):  # from the histogram: within half a bin
        assert summary["bpp_per_image"][name] == pytest.approx(expected["bpp_per_image"][name], rel=0.011), name
    assert summary["compression_ratio"] == round(expected["input_bytes"] / expected["archive_bytes"], 3)


def test_merged_footer_summaries_equal_the_row_by_row_summary(tmp_path):
    archive = tmp_path / "archive"
    _collection(archive)
    # Before the retried key's older row is superseded, the footers count its two rows in two
    # files as two keys (unique_keys is counted file by file); every other figure adds up.
    before = summarize(str(archive), STORAGE, "third", 2.0, Skipped())
    expected = _row_by_row(archive, "third")
    _assert_adds_up(before, expected, keys=False)
    assert (before["rows"], before["unique_keys"], expected["unique_keys"]) == (95, 95, 94)

    assert supersede_retried(str(archive), STORAGE).rows == 1  # what the compress run does before it summarizes

    summary = summarize(str(archive), STORAGE, "third", 2.0, Skipped())
    _assert_adds_up(summary, _row_by_row(archive, "third"))
    assert summary["rows"] == summary["unique_keys"] == 94
    assert summary["retryable_errors"] == 1 and summary["processed_this_job"] == 1  # b/lost stays to be retried
    assert summary["error_reasons"]["an error text without a colon"] == 1
    assert summary["codecs"] == {"avif": 1, "corrdiff": 87} and summary["fallback_share"] == pytest.approx(1 / 88)
    assert summary["bpp_per_image"]["max"] == 8 * 130  # the 1x1 record
    assert json.loads(json.dumps(summary)) == summary


def test_a_rewritten_file_carries_the_summary_of_its_new_rows(tmp_path):
    """supersede reads a file with its footer metadata and writes its other rows: the old summary must not follow."""
    archive = tmp_path / "archive"
    _write(archive, "part-1-x.parquet", [_record("k", 8, 8, 40, "1"), _error("r", LOST, "1")], "1")
    _write(archive, "part-2-y.parquet", [_record("r", 8, 8, 50, "2", created=EARLY + timedelta(hours=1))], "2")
    supersede_retried(str(archive), STORAGE)
    [rewritten] = [p for p in list_data_files(str(archive), STORAGE) if "part-1-" in p]
    summary = FileSummary.from_json(pq.read_metadata(rewritten).metadata[SUMMARY_KEY.encode()])
    assert (summary.rows, summary.ok, summary.errors, summary.record_bytes) == (1, 1, 0, 40)


class _RecordingFileSystem(LocalFileSystem):
    """A local file system that pyarrow reads through fsspec (not natively, as it reads
    LocalFileSystem itself), recording every read: (path, offset, bytes)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reads: list[tuple[str, int, int]] = []

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        return _RecordingFile(self._strip_protocol(path), mode, fs=self, **kwargs)


class _RecordingFile(LocalFileOpener):
    def read(self, size: int = -1) -> bytes:
        offset = self.tell()
        data = super().read(size)
        self.fs.reads.append((self.path, offset, len(data)))
        return data

    def readinto(self, buffer) -> int:
        offset = self.tell()
        count = super().readinto(buffer)
        self.fs.reads.append((self.path, offset, count))
        return count


def test_a_summary_reads_no_record_column(tmp_path, monkeypatch):
    archive = tmp_path / "archive"
    big = [_record(f"k{i:03d}", 64, 64, RECORD_BYTES_BIG, "j", seed=i) for i in range(150)]  # 3 row groups
    _write(archive, "part-j-1.parquet", big[:130] + [_error("bad", "empty file: 0 bytes", "j")], "j")
    _write_old(archive, "part-old-1.parquet", big[130:])
    recording = _RecordingFileSystem(skip_instance_cache=True)
    local = archive_module.filesystem
    monkeypatch.setattr(archive_module, "filesystem", lambda url, storage: (recording, local(url, storage)[1]))

    summary = summarize(str(archive), STORAGE, "j", 1.0, Skipped())

    assert summary["rows"] == 151 and summary["ok"] == 150 and summary["errors"] == 1
    assert {Path(path).name for path, _, _ in recording.reads} == {"part-j-1.parquet", "part-old-1.parquet"}
    for path in list_data_files(str(archive), STORAGE):
        size, metadata = Path(path).stat().st_size, pq.read_metadata(path)
        chunks = [metadata.row_group(g).column(SCHEMA.names.index("record")) for g in range(metadata.num_row_groups)]
        starts = [min(o for o in (c.dictionary_page_offset, c.data_page_offset) if o is not None) for c in chunks]
        records = [(start, start + chunk.total_compressed_size) for chunk, start in zip(chunks, starts)]
        assert all(0 < start < end <= size for start, end in records)
        # Only footers are read, by a reader that takes a file's last 64 KiB at once, and an old
        # file's summary columns: nothing of a record outside that tail.
        tail = size - 64 * 1024
        for read_path, offset, count in recording.reads:
            if read_path == path:
                for start, end in records:
                    assert max(offset, start) >= min(offset + count, end) or max(offset, start) >= tail, \
                        f"{Path(path).name}: read {offset}+{count} of a record chunk {start}-{end}"
    footer_only = [count for path, _, count in recording.reads if Path(path).name == "part-j-1.parquet"]
    assert sum(footer_only) <= 64 * 1024  # of a file of 2 MB


def test_a_footer_summary_that_does_not_match_its_file_is_not_trusted(tmp_path):
    """A file rewritten by another tool that kept the metadata, or a damaged entry: its rows are read instead."""
    archive = tmp_path / "archive"
    path = _write(archive, "part-j-1.parquet", [_record(f"k{i}", 8, 8, 40 + i, "j") for i in range(10)], "j")
    table = pq.read_table(path)
    pq.write_table(table.slice(0, 4), path)  # pyarrow keeps the schema metadata: the summary of ten rows
    assert FileSummary.from_json(pq.read_metadata(path).metadata[SUMMARY_KEY.encode()]).rows == 10
    assert summarize(str(archive), STORAGE, "j", 1.0, Skipped())["rows"] == 4

    pq.write_table(table.replace_schema_metadata({SUMMARY_KEY: '{"version": 1, "rows": 10'}), path)
    assert summarize(str(archive), STORAGE, "j", 1.0, Skipped())["rows"] == 10


@pytest.mark.parametrize("change", [
    {"version": SUMMARY_VERSION + 1}, {"rows": 11}, {"ok": -1}, {"errors": 1.0}, {"jobs": {"j": 9}},
    {"bpp": {"bins": {"3": 1}, "low": None, "high": None}}, {"error_reasons": "many"},
])
def test_footer_summaries_that_do_not_add_up_are_refused(change):
    text = FileSummary.of_rows(pa.Table.from_pylist([_record(f"k{i}", 8, 8, 40 + i, "j") for i in range(10)],
                                                    schema=SCHEMA)).to_json()
    assert FileSummary.from_json(text).rows == 10
    with pytest.raises(ValueError):
        FileSummary.from_json(json.dumps({**json.loads(text), **change}))


def test_error_reasons_are_bounded_per_file():
    rows = [_error(f"k{i}", f"kind {i % 100}: detail", "j") for i in range(300)] + [_error("x", "y" * 5000, "j")]
    summary = FileSummary.of_rows(pa.Table.from_pylist(rows, schema=SCHEMA))
    assert len(summary.error_reasons) == MAX_REASONS and summary.other_reasons == 301 - 3 * MAX_REASONS
    assert all(count == 3 for count in summary.error_reasons.values())  # the most common kinds are kept
    assert len(summary.to_json()) < 8 * 1024
    assert error_reason("y" * 5000) == "y" * 200


def test_the_bpp_histogram_reads_percentiles_within_one_bin_and_merges_exactly():
    rng = np.random.default_rng(3)
    values = np.exp(rng.normal(-2.0, 1.5, 5000))
    whole = BppHistogram.of(pa.array(values))
    parts = [BppHistogram.of(pa.array(part)) for part in np.array_split(values, 7)]
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)
    assert merged == whole and whole.count == 5000
    for q in (0.0, 0.05, 0.5, 0.95, 1.0):
        exact = pc.quantile(pa.array(values), q=q, interpolation="nearest")[0].as_py()
        assert whole.quantile(q) == pytest.approx(exact, rel=2 ** (0.5 / BINS_PER_OCTAVE) - 1)
    assert (whole.quantile(0.0), whole.quantile(1.0)) == (values.min(), values.max())
    assert BppHistogram.of(pa.array([0.0, None, 1e12])).bins == {-20 * BINS_PER_OCTAVE: 1, 20 * BINS_PER_OCTAVE: 1}
    assert BppHistogram().quantile(0.5) is None

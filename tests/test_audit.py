"""The audit command (pipeline.cli, as jobs/audit.py runs it) on archives written by the
compress job: locally and on S3, passing and failing thresholds, damaged records and files,
missing and changed originals, the report."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from corrdiff.metrics import lpips_backbone_path
from pipeline.cli import main as cli
from pipeline.compress import CodecSettings, CompressConfig, run_compress
from pipeline.resources import ResourceSettings
from pipeline.sources import SourceConfig

from archives import EXAMPLES, photo_folder, write_tar_shard


pytestmark = pytest.mark.skipif(not lpips_backbone_path("alex").exists(),
                                reason="LPIPS weights not installed (scripts/setup.sh)")
LOOSE = "thresholds:\n  lpips.median: {max: 5.0}\n  psnr.p5: {min: 0}\n  integrity_failures: {max: 0}\n"


def _compress(source: str, output: str, model: Path, storage=None, **input) -> None:
    extra = {"storage": storage} if storage is not None else {}
    run_compress(CompressConfig(input=SourceConfig(url=source, **input), output=output, **extra,
                                codec=CodecSettings(model=str(model), device="cpu"),
                                resources=ResourceSettings(rows_per_file=4), max_pixels=300_000))


def _two_file_archive(root: Path, model: Path) -> Path:
    """The photo folder archived in two runs (photos, then the bad inputs: a resume), so the
    archive has at least two data files whatever Ray's block bundling does."""
    photo_folder(root / "in", broken=False)
    _compress(str(root / "in"), str(root / "archive"), model)
    photo_folder(root / "in")
    _compress(str(root / "in"), str(root / "archive"), model)
    return root / "archive"


@pytest.fixture(scope="module")
def archive(ray_local, tiny_model, tmp_path_factory) -> Path:
    return _two_file_archive(tmp_path_factory.mktemp("audit"), tiny_model)


def _audit(tmp_path: Path, *args: str, config: str = LOOSE) -> tuple[int, dict]:
    config_file = tmp_path / f"audit-{len(list(tmp_path.glob('audit-*.yaml')))}.yaml"
    config_file.write_text(config + "device: cpu\nworst: 2\ncrop: 64\n")
    code = cli(["audit", *args, "--config", str(config_file)])
    report = Path(args[args.index("--report") + 1])
    return code, json.loads((report / "latest.json").read_text())


class _Page(HTMLParser):
    """Collects what a browser would fetch (src/href) and the visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.sources += [v for k, v in attrs if k in ("src", "href") and v]

    def handle_data(self, data):
        self.text.append(data)


def _page(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    page.close()
    return page


def test_audit_passes_and_writes_a_self_contained_report(archive, tmp_path):
    report = tmp_path / "reports"
    code, summary = _audit(tmp_path, "--archive", str(archive), "--report", str(report), "--sample", "8",
                           "--audit-id", "first")
    assert code == 0 and summary["verdict"] == "PASS" and summary["kind"] == "audit"
    folder = report / "first"
    metrics = pq.read_table(folder / "metrics.parquet").to_pylist()
    assert len(metrics) == summary["measures"]["sampled"] == 8
    assert len({(r["archive_file"], r["archive_row"]) for r in metrics}) == 8
    assert len({r["archive_file"] for r in metrics}) >= 2  # spread over the archive's files
    scored = [r for r in metrics if r["record_status"] == "ok"]
    assert scored and summary["measures"]["scored"] == len(scored)
    for row in scored:
        assert row["original_status"] == "ok" and row["lpips"] > 0 and row["bpp"] > 0
        assert row["psnr"] == row["archived_psnr"]  # same decoder, same pixels as at compression time
    compress_errors = [r for r in metrics if r["record_status"] == "compress_error"]
    assert summary["measures"]["error_rate"] == len(compress_errors) / 8

    page = _page(folder / "report.html")
    text = " ".join(page.text)
    assert "PASS" in text and "Worst images" in text and "Integrity" in text and "Trend" in text
    assert page.sources and all(s.startswith("data:image/png;base64,") for s in page.sources)  # nothing external
    sizes = [Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))).size for s in page.sources]
    assert len(sizes) == 1 + 2 * 2  # the distribution plots, then two worst images x (original, restored)
    assert (report / "latest.html").read_text() == (folder / "report.html").read_text()

    # The same seed over the same archive scores the same images.
    _audit(tmp_path, "--archive", str(archive), "--report", str(tmp_path / "again"), "--sample", "8",
           "--audit-id", "again")
    again = pq.read_table(tmp_path / "again" / "again" / "metrics.parquet")
    assert sorted(again["key"].to_pylist()) == sorted(r["key"] for r in metrics)


def test_thresholds_fail_with_banner_exit_code_and_trend(archive, tmp_path):
    report = tmp_path / "reports"
    assert _audit(tmp_path, "--archive", str(archive), "--report", str(report), "--sample", "4",
                  "--audit-id", "a1")[0] == 0
    strict = "dists: true\nthresholds:\n  lpips.median: {max: 0.0001}\n  error_rate: {max: 0.5}\n" \
             "  dists.median: {max: 1.0}\n"
    code, summary = _audit(tmp_path, "--archive", str(archive), "--report", str(report), "--sample", "4",
                           "--audit-id", "a2", config=strict)
    assert code == 1 and summary["verdict"] == "FAIL"
    assert [c["status"] for c in summary["checks"]] == ["fail", "pass", "pass"]
    scored = [r for r in pq.read_table(report / "a2" / "metrics.parquet").to_pylist() if r["psnr"] is not None]
    assert scored and all(0 < r["dists"] < 1 for r in scored)
    assert summary["measures"]["dists.median"] == pytest.approx(float(np.median([r["dists"] for r in scored])))
    text = " ".join(_page(report / "a2" / "report.html").text)
    assert "FAIL: 1 of 3 checks breached: lpips.median" in text and "median DISTS" in text
    assert "a1" in text and "a2 (this)" in text and "2 audits under this report prefix" in text
    assert len([s for s in _page(report / "a2" / "report.html").sources]) == 1 + 1 + 2 * 2  # + trend plot


@pytest.mark.parametrize("yaml_text, message", [
    ("thresholds:\n  lpips.medain: {max: 0.3}\n", "unknown threshold measure 'lpips.medain'"),
    ("mode: ee2e\n", "unknown decode mode 'ee2e'"),
    ("thresholds:\n  dists.median: {max: 0.3}\n", "threshold dists.median needs DISTS scored: set dists: true"),
])
def test_bad_config_exits_2(archive, tmp_path, capsys, yaml_text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    assert cli(["audit", "--archive", str(archive), "--report", str(tmp_path / "r"), "--config", str(config)]) == 2
    assert message in capsys.readouterr().err


def _damage(archive: Path, target: Path) -> dict:
    """A copy of the archive with one record's bytes flipped and one data file truncated;
    says which key is corrupt, which keys were lost, and every key's archived status."""
    shutil.copytree(archive, target)
    files = sorted(target.glob("part-*.parquet"))
    statuses = {r["key"]: "ok" if r["error"] is None else "compress_error"
                for f in files for r in pq.read_table(f, columns=["key", "error"]).to_pylist()}
    table = pq.read_table(files[0])
    records = table["record"].to_pylist()
    index = next(i for i, r in enumerate(records) if r is not None)
    damaged = bytearray(records[index])
    damaged[40] ^= 0x01
    records[index] = bytes(damaged)
    schema = pq.read_schema(files[0])
    pq.write_table(table.set_column(table.schema.get_field_index("record"), "record",
                                    pa.array(records, pa.binary())).replace_schema_metadata(schema.metadata), files[0])
    lost = pq.read_table(files[-1])["key"].to_pylist()
    files[-1].write_bytes(files[-1].read_bytes()[:100])
    return {"corrupt": table["key"][index].as_py(), "lost": lost, "statuses": statuses}


def test_corrupt_record_unreadable_file_missing_and_changed_originals(ray_local, tiny_model, tmp_path):
    _two_file_archive(tmp_path, tiny_model)
    damage = _damage(tmp_path / "archive", tmp_path / "damaged")
    (tmp_path / "in" / "photos" / "life.jpg").unlink()
    changed = tmp_path / "in" / "photos" / "sunset.jpg"
    changed.write_bytes(changed.read_bytes() + b"\0")
    code, summary = _audit(tmp_path, "--archive", str(tmp_path / "damaged"), "--report", str(tmp_path / "r"),
                           "--sample", "100%", config="thresholds: {integrity_failures: {max: 0}}\n")
    m = summary["measures"]
    assert code == 1 and summary["verdict"] == "FAIL"
    assert m["corrupt_records"] == 1 and m["unreadable_files"] == 1 and m["integrity_failures"] == 2
    assert m["sampled"] == 10 - len(damage["lost"])
    rows = {r["key"]: r for r in pq.read_table(next((tmp_path / "r").glob("*/metrics.parquet"))).to_pylist()}
    assert rows[damage["corrupt"]]["record_status"] == "corrupt" and "checksum" in rows[damage["corrupt"]]["error"]
    surviving = set(rows) - {None}
    if "photos/life.jpg" in surviving:
        assert rows["photos/life.jpg"]["original_status"] == "missing" and rows["photos/life.jpg"]["psnr"] is None
    if "photos/sunset.jpg" in surviving:
        assert rows["photos/sunset.jpg"]["original_status"] == "changed"
    assert m["missing_originals"] == int("photos/life.jpg" in surviving)
    assert m["changed_originals"] == int("photos/sunset.jpg" in surviving)
    text = " ".join(_page(next((tmp_path / "r").glob("*/report.html"))).text)
    assert "unreadable archive file" in text and "corrupt record" in text
    assert "asked for 100% of the rows" in text  # what was asked, beside what was sampled and scored

    # --verify-all: every record, no scoring; the same two integrity failures.
    code, verify = _audit(tmp_path, "--archive", str(tmp_path / "damaged"), "--report", str(tmp_path / "v"),
                          "--verify-all", config="thresholds: {integrity_failures: {max: 0}, lpips.median: {max: 1}}\n")
    assert code == 1 and verify["kind"] == "verify"
    expected = Counter("corrupt" if key == damage["corrupt"] else status
                       for key, status in damage["statuses"].items() if key not in damage["lost"])
    assert verify["record_statuses"] == dict(sorted(expected.items()))
    assert expected["corrupt"] == 1 and expected["ok"] >= 1
    assert [c["status"] for c in verify["checks"]] == ["fail", "n/a"]
    problems = pq.read_table(next((tmp_path / "v").glob("*/metrics.parquet"))).to_pylist()
    assert {r["record_status"] for r in problems} == set(expected) - {"ok"} | {"unreadable_file"}
    code, clean = _audit(tmp_path, "--archive", str(tmp_path / "archive"), "--report", str(tmp_path / "v2"),
                         "--verify-all", config="thresholds: {integrity_failures: {max: 0}}\n")
    assert code == 0 and clean["record_statuses"] == {"compress_error": 4, "ok": 6}


def test_audit_on_s3(s3_server, ray_local, tiny_model, tmp_path):
    photos = {f"in/{p.name}": p.read_bytes() for p in sorted(EXAMPLES.glob("*.jpg"))[:3]}
    bucket = s3_server.make_bucket(photos)
    _compress(f"{bucket}/in", f"{bucket}/archive", tiny_model, storage=s3_server.storage)
    config = (LOOSE + f"storage: {{endpoint_url: '{s3_server.endpoint_url}'}}\n")
    code, _ = 0, None
    config_file = tmp_path / "s3.yaml"
    config_file.write_text(config + "device: cpu\nworst: 1\ncrop: 64\n")
    code = cli(["audit", "--archive", f"{bucket}/archive", "--report", f"{bucket}/audits", "--sample", "3",
                           "--audit-id", "s3", "--config", str(config_file)])
    assert code == 0
    bucket_name = bucket.removeprefix("s3://")
    summary = json.loads(s3_server.client.get_object(Bucket=bucket_name, Key="audits/s3/summary.json")["Body"].read())
    assert summary["measures"]["scored"] == 3 and summary["measures"]["missing_originals"] == 0
    page = s3_server.client.get_object(Bucket=bucket_name, Key="audits/latest.html")["Body"].read().decode()
    assert "PASS" in page and page.count("data:image/png;base64,") == 3
    keys = {o["Key"] for o in s3_server.client.list_objects_v2(Bucket=bucket_name, Prefix="audits/")["Contents"]}
    assert {"audits/s3/metrics.parquet", "audits/s3/report.html", "audits/latest.json"} <= keys


def _metrics(report: Path) -> dict[str, dict]:
    return {r["key"]: r for r in pq.read_table(next(report.glob("*/metrics.parquet"))).to_pylist()}


def test_originals_in_tar_shards_are_read_scored_and_checked(ray_local, tiny_model, tmp_path):
    """Each sampled member is read from its shard (one pass per shard), checked and scored; a
    member changed since is 'changed'; an error row is not fetched at all. The shards a.tar
    (b/x.jpg) and a/b.tar (x.jpg) keep two keys, each with its own original."""
    photos = [p.read_bytes() for p in sorted(EXAMPLES.glob("*.jpg"))[:3]]
    write_tar_shard(tmp_path / "in" / "a.tar", {"b/x.jpg": photos[0], "b/y.jpg": photos[1]})
    write_tar_shard(tmp_path / "in" / "a" / "b.tar", {"x.jpg": photos[2], "bad.jpg": b"not an image"})
    _compress(str(tmp_path / "in"), str(tmp_path / "archive"), tiny_model, kind="tar")
    write_tar_shard(tmp_path / "in" / "a.tar", {"b/x.jpg": photos[0], "b/y.jpg": photos[1] + b"\0"})

    _, summary = _audit(tmp_path, "--archive", str(tmp_path / "archive"), "--report", str(tmp_path / "r"),
                        "--sample", "100%")

    rows = _metrics(tmp_path / "r")
    assert sorted(rows) == ["a.tar/b/x.jpg", "a.tar/b/y.jpg", "a/b.tar/bad.jpg", "a/b.tar/x.jpg"]
    for key in ("a.tar/b/x.jpg", "a/b.tar/x.jpg"):
        assert rows[key]["original_status"] == "ok" and rows[key]["psnr"] == rows[key]["archived_psnr"] is not None
    assert rows["a.tar/b/y.jpg"]["original_status"] == "changed" and rows["a.tar/b/y.jpg"]["psnr"] is None
    assert rows["a/b.tar/bad.jpg"]["record_status"] == "compress_error"
    assert rows["a/b.tar/bad.jpg"]["original_status"] is None  # an error row's original is never fetched
    m = summary["measures"]
    assert m["scored"] == 2 and m["changed_originals"] == 1 and m["missing_originals"] == 0


def test_originals_in_parquet_files_are_read_by_key_and_scored(ray_local, tiny_model, tmp_path):
    """A Parquet row's original is found by the key column the compress job was given (the
    archive's metadata says which); keys holding '#' and '::' included; error rows not fetched."""
    photos = [p.read_bytes() for p in sorted(EXAMPLES.glob("*.jpg"))[:3]]
    keys = ["one", "two#2", "three::3", "missing"]
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": keys, "jpeg": [*photos, None]}), tmp_path / "in" / "t.parquet", row_group_size=2)
    _compress(str(tmp_path / "in"), str(tmp_path / "archive"), tiny_model, kind="parquet", key_column="id",
              image_column="jpeg")

    _, summary = _audit(tmp_path, "--archive", str(tmp_path / "archive"), "--report", str(tmp_path / "r"),
                        "--sample", "100%")

    rows = _metrics(tmp_path / "r")
    assert sorted(rows) == sorted(keys)
    for key in keys[:3]:
        assert rows[key]["original_status"] == "ok" and rows[key]["psnr"] == rows[key]["archived_psnr"] is not None
    assert rows["missing"]["record_status"] == "compress_error" and rows["missing"]["original_status"] is None
    assert summary["measures"]["scored"] == 3 and summary["measures"]["missing_originals"] == 0


def test_a_file_named_with_double_colons_is_archived_and_audited_as_itself(ray_local, tiny_model, tmp_path):
    """fsspec would read "a::b.jpg" as "a" (a chained URL): both the compress job and the
    audit read the file the listing found."""
    photos = sorted(EXAMPLES.glob("*.jpg"))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a::b.jpg").write_bytes(photos[0].read_bytes())
    (tmp_path / "in" / "a").write_bytes(photos[1].read_bytes())  # what the chained parse resolves to
    _compress(str(tmp_path / "in"), str(tmp_path / "archive"), tiny_model)

    [archived] = pq.read_table(next((tmp_path / "archive").glob("*.parquet"))).to_pylist()
    assert archived["key"] == "a::b.jpg"
    assert archived["source_sha256"] == hashlib.sha256(photos[0].read_bytes()).hexdigest()
    _, summary = _audit(tmp_path, "--archive", str(tmp_path / "archive"), "--report", str(tmp_path / "r"),
                        "--sample", "100%")
    assert _metrics(tmp_path / "r")["a::b.jpg"]["original_status"] == "ok" and summary["measures"]["scored"] == 1


def _one_file_archive(root: Path) -> Path:
    """A data file written by the archive writer (no Ray): three rows, one an error row."""
    from datetime import datetime, timezone

    from pipeline.archive import SCHEMA, data_file_bytes

    rows = [{"key": f"photos/{name}.jpg", "source_uri": f"file:///in/{name}.jpg",
             "record": hashlib.sha256(name.encode()).digest() * 2 if name else None,  # incompressible, as records are
             "error": None if name else "corrupt or truncated image", "created_at": datetime.now(timezone.utc),
             "job_id": "j"} for name in ("a", "b", "")]
    root.mkdir(parents=True)
    path = root / "part-0.parquet"
    path.write_bytes(data_file_bytes(pa.Table.from_pylist(rows, schema=SCHEMA)))
    return path


@pytest.mark.parametrize("column", ["key", "record"])
def test_a_damaged_page_is_an_unreadable_file_when_read(tmp_path, column):
    """Page checksums are written and verified: a flipped byte inside a page that the
    decompressor does not notice (the footer intact) is an unreadable file, never data."""
    from archives import damage_a_page
    from pipeline.archive import read_columns
    from pipeline.selection import ROW_COLUMNS, UNREADABLE_FILE_KEY, _read_file_rows
    from pipeline.storage import StorageConfig

    path = _one_file_archive(tmp_path / "archive")
    damage_a_page(path, column)
    storage = StorageConfig(retries=1)
    rows = _read_file_rows(pa.table({"path": [str(path)], "rows": pa.array([None], pa.list_(pa.int64()))}),
                           storage, None, ROW_COLUMNS).to_pylist()
    assert [(r["key"], r["archive_row"]) for r in rows] == [(UNREADABLE_FILE_KEY, -1)]
    assert "unreadable archive file" in rows[0]["error"] and "checksum" in rows[0]["error"].lower()
    with pytest.raises(OSError, match="(?i)checksum"):
        read_columns(str(tmp_path / "archive"), storage, ["key", column])


def test_verify_counts_a_file_with_a_damaged_page_with_the_rows_it_held(archive, tmp_path):
    """--verify-all: a file whose footer is intact but whose record page fails its checksum
    is an unreadable file, an integrity failure per row its footer counts, exit status 1."""
    from archives import damage_a_page

    damaged = tmp_path / "damaged"
    shutil.copytree(archive, damaged)
    path = sorted(damaged.glob("part-*.parquet"))[0]
    held = pq.read_metadata(path).num_rows
    damage_a_page(path, "record")
    code, verify = _audit(tmp_path, "--archive", str(damaged), "--report", str(tmp_path / "v"), "--verify-all",
                          config="thresholds: {integrity_failures: {max: 0}}\n")
    m = verify["measures"]
    assert code == 1 and verify["verdict"] == "FAIL"
    assert m["unreadable_files"] == 1 and m["unreadable_rows"] == held and m["integrity_failures"] == held
    assert sum(verify["record_statuses"].values()) == 10 - held  # no '#file' row counted as a record
    problems = pq.read_table(next((tmp_path / "v").glob("*/metrics.parquet"))).to_pylist()
    [row] = [r for r in problems if r["record_status"] == "unreadable_file"]
    assert row["key"] is None and row["archive_file"].endswith(path.name) and "checksum" in row["error"]


def test_nothing_in_a_key_an_error_or_an_earlier_summary_becomes_markup(tmp_path):
    """The report is rendered with autoescaping: a hostile key, error text and earlier
    summary.json (anyone who can write under the report prefix controls it) reach the page
    as text; the only tags are the report's own and the only image sources its data URIs."""
    from pipeline.audit_stages import CROP_SCHEMA, METRICS_SCHEMA
    from pipeline.report import write_report
    from pipeline.storage import StorageConfig
    from pipeline.thresholds import COUNT_MEASURES, MEASURES

    key, error, hostile = "<script>alert(1)</script>.png", '"><img src=x onerror=alert(2)>', "<svg onload=alert(3)>"
    measures = {m: 0.5 for m in MEASURES} | {m: 1 for m in COUNT_MEASURES}
    summary = {"kind": "audit", "audit_id": "now", "time": "2025-02-01T00:00:00", "archive": "file:///a",
               "report": str(tmp_path), "verdict": "FAIL", "archive_rows": 2, "archive_files": 1, "measures": measures,
               "checks": [{"measure": "integrity_failures", "bound": "<= 0", "value": 1, "status": "fail"}],
               "seconds": 1.0, "models": {}, "config": {"sample": "100%", "seed": 0, "mode": "corrdiff",
                                                         "lpips_net": "alex"}}
    earlier = {**summary, "audit_id": f"<b>{hostile}</b>", "time": f"2025-01-01T00:00:00{hostile}",
               "verdict": "'><script>alert(4)</script>", "archive_rows": hostile,
               "measures": {m: hostile for m in MEASURES},
               "checks": [{"measure": hostile, "bound": hostile, "value": hostile, "status": hostile}]}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "summary.json").write_text(json.dumps(earlier))
    metrics = pa.Table.from_pylist([{"key": key, "archive_file": f"file:///a/{hostile}.parquet", "archive_row": 0,
                                     "record_status": "corrupt", "original_status": "ok", "error": error}],
                                   schema=METRICS_SCHEMA)
    write_report(str(tmp_path), StorageConfig(), summary, metrics, CROP_SCHEMA.empty_table())

    class Tags(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.tags: set[str] = set()
            self.attributes: set[str] = set()

        def handle_starttag(self, tag, attrs):
            self.tags.add(tag)
            self.attributes |= {name for name, _ in attrs}

    tags = Tags()
    tags.feed((tmp_path / "now" / "report.html").read_text())
    assert tags.tags <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "code", "div", "table",
                         "tr", "th", "td", "span", "ul", "li", "b", "img", "figure", "figcaption"}
    assert tags.attributes <= {"lang", "charset", "class", "alt", "src"}
    page = _page(tmp_path / "now" / "report.html")
    assert all(s.startswith("data:image/png;base64,") for s in page.sources)
    text = " ".join(page.text)
    assert key in text and error in text and hostile in text  # shown, as text

"""jobs/audit.py on archives written by the compress job: locally and on S3, passing and
failing thresholds, damaged records and files, missing and changed originals, the report."""

from __future__ import annotations

import base64
import io
import json
import shutil
import sys
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from corrdiff.metrics import lpips_backbone_path
from pipeline.compress import CodecSettings, CompressConfig, run_compress
from pipeline.resources import ResourceSettings
from pipeline.sources import SourceConfig

from archives import EXAMPLES, photo_folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "jobs"))

import audit as audit_job  # noqa: E402

pytestmark = pytest.mark.skipif(not lpips_backbone_path("alex").exists(),
                                reason="LPIPS weights not installed (scripts/setup.sh)")
LOOSE = "thresholds:\n  lpips.median: {max: 5.0}\n  psnr.p5: {min: 0}\n  integrity_failures: {max: 0}\n"


def _compress(source: str, output: str, model: Path, storage=None) -> None:
    extra = {"storage": storage} if storage is not None else {}
    run_compress(CompressConfig(input=SourceConfig(url=source), output=output, **extra,
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
    code = audit_job.main([*args, "--config", str(config_file)])
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
    assert audit_job.main(["--archive", str(archive), "--report", str(tmp_path / "r"), "--config", str(config)]) == 2
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
    code = audit_job.main(["--archive", f"{bucket}/archive", "--report", f"{bucket}/audits", "--sample", "3",
                           "--audit-id", "s3", "--config", str(config_file)])
    assert code == 0
    bucket_name = bucket.removeprefix("s3://")
    summary = json.loads(s3_server.client.get_object(Bucket=bucket_name, Key="audits/s3/summary.json")["Body"].read())
    assert summary["measures"]["scored"] == 3 and summary["measures"]["missing_originals"] == 0
    page = s3_server.client.get_object(Bucket=bucket_name, Key="audits/latest.html")["Body"].read().decode()
    assert "PASS" in page and page.count("data:image/png;base64,") == 3
    keys = {o["Key"] for o in s3_server.client.list_objects_v2(Bucket=bucket_name, Prefix="audits/")["Contents"]}
    assert {"audits/s3/metrics.parquet", "audits/s3/report.html", "audits/latest.json"} <= keys
